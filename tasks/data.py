"""Data stage: load sources -> normalise -> length filters -> exact + near dedup -> seeded split.

Output artifact: `<kind>/<split>.parquet` for each kind present (corpus, sft, preference) and
`stats.json` (rows loaded / dropped per reason / kept / per split), so a user can see what the
cleaning did before paying for training. Tokenization is *not* here: it depends on the model's
tokenizer and lives in the `pack` step (tasks/pack.py), keyed by the tokenizer too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from fasttrack.core.config import CleanConfig, RunConfig
from fasttrack.core.errors import DataError
from fasttrack.core.stage import BuildResult, Stage, StageSpec
from fasttrack.lib.cleaning import (
    CleanStats,
    exact_dedup,
    filter_length,
    near_dedup,
    normalize_text,
    split_records,
)
from fasttrack.lib.datasets import SPLITS
from fasttrack.lib.hub import hf_token
from fasttrack.lib.sources import content_hash, load_source

STAGE = Stage("data", "2", retries=1, retry_delay_seconds=2)  # 2: one schema per kind
_STR = pa.string()
_META = [pa.field("source", _STR), pa.field("id", _STR)]
# Why explicit: `pa.Table.from_pylist` takes its columns from the first row, so `source`/`id`
# vanished from a split whose first row came from a file without them.
SCHEMAS = {
    "corpus": pa.schema([pa.field("text", _STR), pa.field("title", _STR), *_META]),
    "sft": pa.schema(
        [pa.field("messages", pa.list_(pa.struct([("role", _STR), ("content", _STR)]))), *_META]
    ),
    "preference": pa.schema(
        [pa.field("prompt", _STR), pa.field("chosen", _STR), pa.field("rejected", _STR), *_META]
    ),
}


def text_of(kind: str) -> Callable[[dict], str]:
    """The text a row is filtered and deduplicated on."""
    if kind == "corpus":
        return lambda r: r["text"]
    if kind == "sft":
        return lambda r: "\n".join(m["content"] for m in r["messages"])
    return lambda r: "\n".join((r["prompt"], r["chosen"], r["rejected"]))


def data_spec(cfg: RunConfig) -> StageSpec:
    inputs = {f"source{i}": content_hash(src) for i, src in enumerate(cfg.data.sources)}
    config = cfg.data.model_dump(mode="json", exclude={"max_record_chars"})  # rejects, never alters
    return STAGE.spec(config, inputs=inputs)


def normalize_row(row: dict, clean: CleanConfig) -> dict:
    def norm(text: str) -> str:
        return normalize_text(
            text, unicode_form=clean.unicode_form, collapse_whitespace=clean.collapse_whitespace
        )

    out = dict(row)
    if "messages" in row:
        out["messages"] = [{**m, "content": norm(m["content"])} for m in row["messages"]]
    for name in ("text", "title", "prompt", "chosen", "rejected"):
        if isinstance(row.get(name), str):
            out[name] = norm(row[name])
    return out


def clean_kind(kind: str, rows: list[dict], cfg: RunConfig) -> tuple[list[dict], CleanStats]:
    """Normalise, filter and deduplicate the rows of one kind; stats say what went where."""
    clean, get = cfg.data.clean, text_of(kind)
    stats = CleanStats(loaded=len(rows))
    rows = [normalize_row(r, clean) for r in rows]
    rows = filter_length(
        rows, get, min_chars=clean.min_chars, max_chars=clean.max_chars, stats=stats
    )
    if kind == "sft":
        kept = [
            r for r in rows if any(m["role"] == "assistant" and m["content"] for m in r["messages"])
        ]
        stats.drop("no_assistant_turn", len(rows) - len(kept))
        rows = kept
    if kind == "preference":
        kept = [r for r in rows if all(r[k].strip() for k in ("prompt", "chosen", "rejected"))]
        stats.drop("empty_field", len(rows) - len(kept))
        rows = [r for r in kept if r["chosen"] != r["rejected"]]
        stats.drop("chosen_equals_rejected", len(kept) - len(rows))
    if clean.exact_dedup:
        rows = exact_dedup(rows, get, stats)
    if clean.near_dedup:
        rows = near_dedup(
            rows,
            get,
            stats,
            threshold=clean.near_dedup_threshold,
            num_perm=clean.num_perm,
            shingle_size=clean.shingle_size,
            seed=cfg.data.split.seed,
        )
    stats.kept = len(rows)
    if not rows:
        raise DataError(
            f"data: the {kind} dataset is empty after cleaning: {stats.describe_empty()}"
        )
    return rows, stats


def build_data(cfg: RunConfig, spec: StageSpec, out: Path) -> BuildResult:
    """Load, clean, deduplicate and split every source."""
    by_kind: dict[str, list[dict]] = {}
    for src in cfg.data.sources:
        kind, rows = load_source(src, cfg.data.encoding, cfg.data.max_record_chars, hf_token(cfg))
        by_kind.setdefault(kind, []).extend(rows)
    metrics: dict[str, Any] = {}
    stats_out: dict[str, Any] = {}
    split = cfg.data.split
    for kind, rows in sorted(by_kind.items()):
        rows, stats = clean_kind(kind, rows, cfg)
        parts = split_records(
            rows, text_of(kind), validation=split.validation, test=split.test, seed=split.seed
        )
        (out / kind).mkdir()
        for name in SPLITS:
            table = pa.Table.from_pylist(parts[name], schema=SCHEMAS[kind])
            pq.write_table(table, out / kind / f"{name}.parquet")
            metrics[f"{kind}.{name}_rows"] = len(parts[name])
        stats_out[kind] = {**stats.as_dict(), **{f"{s}_rows": len(parts[s]) for s in SPLITS}}
        metrics[f"{kind}.dropped"] = stats.loaded - stats.kept
    (out / "stats.json").write_text(json.dumps(stats_out, indent=2, sort_keys=True))
    return BuildResult(metrics=metrics, extra={"stats": stats_out})


prepare_data, data_task = STAGE.define(data_spec, build_data)
