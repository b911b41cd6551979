"""Data stage: load sources -> normalise -> length filters -> exact + near dedup -> seeded split.

Output artifact: `<kind>/<split>.parquet` for each kind present (corpus, sft, preference) and
`stats.json` (rows loaded / dropped per reason / kept / per split), so a user can see what the
cleaning did before paying for training. Tokenization is *not* here: it depends on the model's
tokenizer and lives in the `pack` step (tasks/pack.py), keyed by the tokenizer too.
Sources are streamed in record batches (fasttrack/lib/dataprep.py): memory does not grow with
the corpus, and the per-row work runs in `data.workers` processes.
"""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from fasttrack.core.config import RunConfig
from fasttrack.core.stage import BuildResult, Stage, StageSpec
from fasttrack.lib.dataprep import (
    SCHEMAS,
    SPLITS,
    default_workers,
    prepare,
    source_work,
    text_of,
)
from fasttrack.lib.hub import hf_token
from fasttrack.lib.pools import dask_client
from fasttrack.lib.sources import KIND_OF_FORMAT, content_hash, input_bytes

# 3: streamed; MinHash of crc32-hashed word shingles with vectorised permutations (near-dup
# decisions may differ from v2's datasketch hashes on borderline pairs).
STAGE = Stage("data", "3", retries=1, retry_delay_seconds=2)
__all__ = ["SCHEMAS", "data_spec", "data_task", "prepare_data", "text_of"]
_NOT_IN_KEY = {"max_record_chars", "workers", "engine"}  # reject / schedule, never alter the output


def data_spec(cfg: RunConfig) -> StageSpec:
    inputs = {f"source{i}": content_hash(src) for i, src in enumerate(cfg.data.sources)}
    config = cfg.data.model_dump(mode="json", exclude=_NOT_IN_KEY)
    return STAGE.spec(config, inputs=inputs)


def build_data(cfg: RunConfig, spec: StageSpec, out: Path) -> BuildResult:
    """Load, clean, deduplicate and split every source, streaming."""
    data, token = cfg.data, hf_token(cfg)
    sources = (
        (KIND_OF_FORMAT[src.format], source_work(src, data.encoding, data.max_record_chars, token))
        for src in data.sources
    )
    workers = data.workers or default_workers(sum(input_bytes(s) for s in data.sources))
    if data.engine == "dask":
        with dask_client(cfg, workers) as client:
            workers = sum(client.nthreads().values())
            kinds = prepare(sources, data, out, client.get_executor(pure=False), 2 * workers)
    elif workers > 1:
        # forkserver: the stage may run in a thread of a Prefect process (fork + threads hangs)
        ctx = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            kinds = prepare(sources, data, out, pool, window=2 * workers)
    else:
        kinds = prepare(sources, data, out)
    metrics: dict[str, Any] = {}
    stats_out: dict[str, Any] = {}
    for kind, (stats, counts) in kinds.items():
        for name in SPLITS:
            metrics[f"{kind}.{name}_rows"] = counts[name]
        stats_out[kind] = {**stats.as_dict(), **{f"{s}_rows": counts[s] for s in SPLITS}}
        metrics[f"{kind}.dropped"] = stats.loaded - stats.kept
    (out / "stats.json").write_text(json.dumps(stats_out, indent=2, sort_keys=True))
    extra = {"stats": stats_out, "workers": workers, "engine": data.engine}
    return BuildResult(metrics=metrics, extra=extra)


prepare_data, data_task = STAGE.define(data_spec, build_data)
