"""The data stage's streaming engine: record batches in, parquet splits out, bounded memory.

Per batch (in a worker process when `workers > 1`): normalise, length and kind filters, the
exact-dedup digest, the split rank and the MinHash signature of every surviving row
(`process_batch`, a pure function of the rows: it is what runs on Dask workers too). In the
main process, in input order: exact dedup (16-byte digests in sorted arrays, never the texts),
greedy near dedup (`minhash.LshIndex`, signatures spilled to disk), and an append to a spool
parquet file: ~0.22 KB of memory per kept row in all (was ~0.7 KB). At the end the split is
decided from the ranks alone (8 bytes per kept row) exactly as `cleaning.split_records` does it,
and the spool is streamed into `<kind>/<split>.parquet`. Nothing depends on the batch size or
the worker count: results are a function of the rows and their order only.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fasttrack.core.config import CleanConfig, DataConfig, SourceConfig
from fasttrack.core.errors import DataError
from fasttrack.lib.cleaning import (
    CleanStats,
    exact_digest,
    filter_length,
    lsh_params,
    normalize_text,
    split_digest,
    split_sizes,
)
from fasttrack.lib.jsonl_blocks import JsonlBlock, blocks_apply, jsonl_blocks
from fasttrack.lib.minhash import LshIndex, band_keys, signatures
from fasttrack.lib.sources import iter_source, row_chars
from fasttrack.lib.spill import DigestSet

SPLITS = ("train", "validation", "test")
BATCH_CHARS = 4_000_000  # a batch closes at this many characters or BATCH_ROWS rows
BATCH_ROWS = 4096
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
Row = dict[str, Any]
Work = list[Row] | JsonlBlock  # what one process_batch call cleans


def text_of(kind: str) -> Callable[[Row], str]:
    """The text a row is filtered, deduplicated and split on."""
    if kind == "corpus":
        return lambda r: r["text"]
    if kind == "sft":
        return lambda r: "\n".join(m["content"] for m in r["messages"])
    return lambda r: "\n".join((r["prompt"], r["chosen"], r["rejected"]))


def normalize_row(row: Row, clean: CleanConfig) -> Row:
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


@dataclass(frozen=True)
class Options:
    """What a batch needs to know (picklable: it travels to worker processes)."""

    clean: CleanConfig
    seed: int
    validation: float
    test: float
    bands: int
    rows: int

    @classmethod
    def of(cls, data: DataConfig) -> Options:
        bands, rows = lsh_params(data.clean.near_dedup_threshold, data.clean.num_perm)
        split = data.split
        return cls(data.clean, split.seed, split.validation, split.test, bands, rows)


@dataclass
class Batch:
    """A processed batch: surviving rows and, per row, what the sequential steps need."""

    kind: str
    loaded: int
    table: pa.Table
    dropped: dict[str, int]
    exact: list[bytes]
    rank: np.ndarray  # uint64: first 8 bytes of the split digest, big-endian (same order)
    sigs: np.ndarray | None = None
    keys: np.ndarray | None = None


def process_batch(kind: str, work: Work, opt: Options) -> Batch:
    """The per-row part of cleaning; order-preserving and independent of other batches."""
    rows = work.rows() if isinstance(work, JsonlBlock) else work
    clean, get = opt.clean, text_of(kind)
    stats, loaded = CleanStats(), len(rows)
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
    texts = [get(r) for r in rows]
    rank = np.array(
        [int.from_bytes(split_digest(t, opt.seed)[:8], "big") for t in texts], np.uint64
    )
    batch = Batch(
        kind=kind,
        loaded=loaded,
        table=pa.Table.from_pylist(rows, schema=SCHEMAS[kind]),
        dropped=stats.dropped,
        exact=[exact_digest(t)[:16] for t in texts] if clean.exact_dedup else [],
        rank=rank,
    )
    if clean.near_dedup and texts:
        batch.sigs = signatures(
            texts, num_perm=clean.num_perm, shingle_size=clean.shingle_size, seed=opt.seed
        )
        batch.keys = band_keys(batch.sigs, opt.bands, opt.rows)
    return batch


def batches(rows: Iterable[Row], size_of: Callable[[Row], int]) -> Iterator[list[Row]]:
    """Rows grouped into batches of at most BATCH_ROWS rows / about BATCH_CHARS characters."""
    batch: list[Row] = []
    chars = 0
    for row in rows:
        batch.append(row)
        chars += size_of(row)
        if len(batch) >= BATCH_ROWS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def source_work(
    src: SourceConfig, encoding: str, max_chars: int | None, token: str | None
) -> Iterator[Work]:
    """A source's work items: raw blocks of JSONL (parsed by the workers), else row batches."""
    if blocks_apply(src, encoding):
        return jsonl_blocks(src, encoding, max_chars)
    return batches(iter_source(src, encoding, max_chars, token), row_chars)


def ordered_map(
    fn: Callable[..., Batch], items: Iterable[tuple], executor: Executor | None, window: int
) -> Iterator[Batch]:
    """fn(*item) for each item, in order; at most `window` items in flight (bounded memory:
    `Executor.map` would read the whole input ahead)."""
    if executor is None:
        for item in items:
            yield fn(*item)
        return
    pending: deque[Future] = deque()
    try:
        for item in items:
            pending.append(executor.submit(fn, *item))
            if len(pending) >= window:
                yield pending.popleft().result()
    except DataError:  # an error of a later item: earlier items' own errors come first
        while pending:
            yield pending.popleft().result()
        raise
    while pending:
        yield pending.popleft().result()


@dataclass
class KindState:
    """The sequential state of one kind: stats, dedup sets, LSH index and the spool file."""

    kind: str
    opt: Options
    spool: Path
    stats: CleanStats = field(default_factory=CleanStats)
    seen: DigestSet = field(default_factory=DigestSet)
    ranks: list[np.ndarray] = field(default_factory=list)
    lsh: LshIndex | None = None
    writer: pq.ParquetWriter | None = None

    def add(self, batch: Batch) -> None:
        self.stats.loaded += batch.loaded
        for reason, n in batch.dropped.items():
            self.stats.drop(reason, n)
        keep = np.ones(batch.table.num_rows, bool)
        if self.opt.clean.exact_dedup:
            for i, digest in enumerate(batch.exact):
                keep[i] = self.seen.add_new(digest)
            self.stats.drop("exact_duplicate", int((~keep).sum()))
        if self.opt.clean.near_dedup and batch.sigs is not None:
            if self.lsh is None:
                c = self.opt.clean
                self.lsh = LshIndex(c.num_perm, self.opt.bands, self.opt.rows,
                                    c.near_dedup_threshold, self.spool.parent)  # fmt: skip
            sub = np.nonzero(keep)[0]
            near = self.lsh.filter(batch.sigs[sub], batch.keys[sub])
            keep[sub[~near]] = False
            self.stats.drop("near_duplicate", int((~near).sum()))
        self.ranks.append(batch.rank[keep])
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.spool, SCHEMAS[self.kind])
        self.writer.write_table(batch.table.filter(pa.array(keep)))

    def finish(self, folder: Path) -> dict[str, int]:
        """Split the kept rows (rank order, as `split_records`) into `<folder>/<split>.parquet`."""
        assert self.writer is not None
        self.writer.close()
        if self.lsh is not None:
            self.lsh.close()
        rank = np.concatenate(self.ranks) if self.ranks else np.empty(0, np.uint64)
        n = len(rank)
        self.stats.kept = n
        n_test, n_val = split_sizes(n, validation=self.opt.validation, test=self.opt.test)
        order = np.lexsort((np.arange(n), rank))  # ties (equal texts) in input order
        label = np.zeros(n, np.int8)  # 0 train, 1 validation, 2 test
        label[order[:n_test]] = 2
        label[order[n_test : n_test + n_val]] = 1
        counts = {s: 0 for s in SPLITS}
        writers = {s: pq.ParquetWriter(folder / f"{s}.parquet", SCHEMAS[self.kind]) for s in SPLITS}
        start = 0
        for rb in pq.ParquetFile(self.spool).iter_batches(batch_size=BATCH_ROWS):
            part = pa.Table.from_batches([rb])
            lab = pa.array(label[start : start + rb.num_rows])
            start += rb.num_rows
            for code, name in enumerate(SPLITS):
                sub = part.filter(pc.equal(lab, code))
                counts[name] += sub.num_rows
                writers[name].write_table(sub)
        for w in writers.values():
            w.close()
        self.spool.unlink()
        return counts


def default_workers(total_bytes: int) -> int:
    """Processes worth starting: none for small inputs (a pool costs ~1 s to start)."""
    return 1 if total_bytes < 16_000_000 else max(1, min(os.cpu_count() or 1, 8))


def prepare(
    sources: Iterable[tuple[str, Iterable[Work]]],
    data: DataConfig,
    out: Path,
    executor: Executor | None = None,
    window: int = 4,
) -> dict[str, tuple[CleanStats, dict[str, int]]]:
    """Clean, deduplicate and split (kind, work items) sources (see `source_work`) into
    `out/<kind>/<split>.parquet`.
    Returns (stats, rows per split) per kind; raises DataError for a kind left empty."""
    opt = Options.of(data)
    states: dict[str, KindState] = {}

    def items() -> Iterator[tuple[str, Work, Options]]:
        for kind, work in sources:
            if kind not in states:
                (out / kind).mkdir()
                states[kind] = KindState(kind, opt, out / kind / "_spool.parquet")
            for item in work:
                yield kind, item, opt

    for batch in ordered_map(process_batch, items(), executor, window):
        states[batch.kind].add(batch)
    result = {}
    for kind, state in sorted(states.items()):
        if not sum(len(r) for r in state.ranks):
            raise DataError(
                f"data: the {kind} dataset is empty after cleaning: {state.stats.describe_empty()}"
            )
        result[kind] = (state.stats, state.finish(out / kind))
    return result
