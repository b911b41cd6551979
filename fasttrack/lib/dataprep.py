"""The data stage's streaming engine: record batches in, parquet splits out, bounded memory.

Per batch (in a worker process when `workers > 1`): normalise, length and kind filters, the
exact-dedup digest, the split rank and the MinHash signature of every surviving row
(`process_batch`, a pure function of the rows: it is what runs on Dask workers too). In the
main process, in input order: the rows (with their split rank) are appended to a spool parquet
file and their digests, band keys and signatures to the spilled dedup state (`dedup.Dedup`);
nothing held in memory grows with the rows. At the end, dedup is decided partition by partition
(one verdict byte per row), the split cut-offs are found from the spooled ranks exactly as
`cleaning.split_records` ranks rows, and the spool is streamed into `<kind>/<split>.parquet`.
Nothing depends on the batch size or the worker count: results are a function of the rows and
their order only.
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
from fasttrack.lib.dedup import EXACT, KEEP, NEAR, Dedup
from fasttrack.lib.jsonl_blocks import JsonlBlock, blocks_apply, jsonl_blocks
from fasttrack.lib.minhash import band_keys, signatures
from fasttrack.lib.sources import iter_source, row_chars

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
_RANK = "_rank"  # the split rank, a spool-only column


def _spool_schema(kind: str) -> pa.Schema:
    return SCHEMAS[kind].append(pa.field(_RANK, pa.uint64()))


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
    """The sequential state of one kind: stats, the spilled dedup state and the spool file.

    Every row that passed the filters goes to the spool (with its split rank); dedup is decided
    at the end (`dedup.Dedup`) and the split from the ranks read back: nothing in memory grows
    with the rows except one verdict byte per row.
    """

    kind: str
    opt: Options
    spool: Path
    stats: CleanStats = field(default_factory=CleanStats)
    dedup: Dedup | None = None
    writer: pq.ParquetWriter | None = None
    verdict: np.ndarray | None = None

    def add(self, batch: Batch) -> None:
        self.stats.loaded += batch.loaded
        for reason, n in batch.dropped.items():
            self.stats.drop(reason, n)
        if self.dedup is None:
            c = self.opt.clean
            self.dedup = Dedup(exact=c.exact_dedup, near=c.near_dedup, num_perm=c.num_perm,
                               bands=self.opt.bands, threshold=c.near_dedup_threshold,
                               folder=self.spool.parent)  # fmt: skip
            self.writer = pq.ParquetWriter(self.spool, _spool_schema(self.kind))
        assert self.writer is not None
        self.dedup.add(batch.table.num_rows, batch.exact, batch.sigs, batch.keys)
        self.writer.write_table(batch.table.append_column(_RANK, pa.array(batch.rank)))

    def decide(self) -> int:
        """Dedup verdicts for every row; records the drops; returns the rows kept."""
        if self.dedup is None or self.writer is None:
            return 0
        self.writer.close()
        self.verdict = self.dedup.decide()
        counts = np.bincount(self.verdict, minlength=3)
        if self.opt.clean.exact_dedup:
            self.stats.drop("exact_duplicate", int(counts[EXACT]))
        if self.opt.clean.near_dedup:
            self.stats.drop("near_duplicate", int(counts[NEAR]))
        self.stats.kept = int(counts[KEEP])
        return self.stats.kept

    def _ranks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(rank, row number) of the kept rows, spool batch by spool batch."""
        assert self.verdict is not None
        start = 0
        for rb in pq.ParquetFile(self.spool, pre_buffer=False).iter_batches(
            BATCH_ROWS, columns=[_RANK]
        ):
            rank = rb.column(0).to_numpy()
            rows = np.arange(start, start + len(rank))
            keep = self.verdict[start : start + len(rank)] == KEEP
            start += len(rank)
            yield rank[keep], rows[keep]

    def _cuts(self, positions: list[int]) -> list[tuple[int, int] | None]:
        """The (rank, row) at each position of the kept rows ranked by (rank, input order), as
        `cleaning.split_records` ranks them: a histogram of the top 16 rank bits, then only the
        rows of the buckets holding a position (two passes over the rank column)."""
        hist = np.zeros(1 << 16, np.int64)
        for rank, _ in self._ranks():
            hist += np.bincount((rank >> np.uint64(48)).astype(np.int64), minlength=1 << 16)
        cum = np.cumsum(hist)
        want = {k: int(np.searchsorted(cum, k, "right")) for k in positions if k < cum[-1]}
        found: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {b: [] for b in want.values()}
        for rank, rows in self._ranks():
            top = rank >> np.uint64(48)
            for b, parts in found.items():
                sel = top == b
                parts.append((rank[sel], rows[sel]))
        out: list[tuple[int, int] | None] = []
        for k in positions:
            if k not in want:
                out.append(None)  # past the end: every row is before it
                continue
            b = want[k]
            rank = np.concatenate([r for r, _ in found[b]])
            rows = np.concatenate([w for _, w in found[b]])
            at = np.lexsort((rows, rank))[k - (cum[b] - hist[b])]
            out.append((int(rank[at]), int(rows[at])))
        return out

    def finish(self, folder: Path) -> dict[str, int]:
        """Split the kept rows (rank order, as `split_records`) into `<folder>/<split>.parquet`."""
        assert self.verdict is not None
        n = self.stats.kept
        n_test, n_val = split_sizes(n, validation=self.opt.validation, test=self.opt.test)
        cuts = self._cuts([n_test, n_test + n_val])
        counts = {s: 0 for s in SPLITS}
        writers = {s: pq.ParquetWriter(folder / f"{s}.parquet", SCHEMAS[self.kind]) for s in SPLITS}
        start = 0
        # pre_buffer=False: with it, iter_batches keeps every row group it has read (Arrow's
        # read cache), ~1 KB per row of a 300 MB spool: the last memory that grew with the rows
        for rb in pq.ParquetFile(self.spool, pre_buffer=False).iter_batches(batch_size=BATCH_ROWS):
            keep = self.verdict[start : start + rb.num_rows] == KEEP
            rows = np.arange(start, start + rb.num_rows)[keep]
            start += rb.num_rows
            part = pa.Table.from_batches([rb]).filter(pa.array(keep))
            rank = part.column(_RANK).to_numpy()
            before = [_before(rank, rows, cut) for cut in cuts]
            label = before[1].astype(np.int8)  # 0 train, 1 validation, 2 test
            label[before[0]] = 2
            part = part.drop_columns([_RANK])
            lab = pa.array(label)
            for code, name in enumerate(SPLITS):
                sub = part.filter(pc.equal(lab, code))
                counts[name] += sub.num_rows
                writers[name].write_table(sub)
        for w in writers.values():
            w.close()
        self.spool.unlink()
        return counts


def _before(rank: np.ndarray, rows: np.ndarray, cut: tuple[int, int] | None) -> np.ndarray:
    """Rows ranked before `cut` by (rank, row number)."""
    if cut is None:
        return np.ones(len(rank), bool)
    r, w = np.uint64(cut[0]), cut[1]
    return (rank < r) | ((rank == r) & (rows < w))


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
        if not state.decide():
            raise DataError(
                f"data: the {kind} dataset is empty after cleaning: {state.stats.describe_empty()}"
            )
        result[kind] = (state.stats, state.finish(out / kind))
    return result
