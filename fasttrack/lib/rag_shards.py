"""Sharded, incremental embedding of RAG chunks straight into the artifact's `embeddings.npy`.

Why shards: at a million chunks neither the passages nor the vectors fit comfortably in one
Python list, and one process embeds too slowly. Passages to embed are cut into shards of
`rag.shard_size`; each shard is embedded by a worker (in-process, local processes or Dask
workers: fasttrack/lib/pools.py) and written into a memory-mapped `embeddings.npy` as it
finishes, with at most a few shards in flight. Rows are decided before any shard runs, so the
file (and the artifact key) do not depend on the shard size or the number of workers.
Incremental: a passage whose sha256 is in the family's previous artifact is copied from its
memory-mapped vectors instead of embedded; identical passages are embedded once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fasttrack.core.config import StoreConfig
from fasttrack.core.errors import ModelError
from fasttrack.core.store import ArtifactRef, ArtifactStore
from fasttrack.lib.dataprep import ordered_map
from fasttrack.lib.embedder import Embedder
from fasttrack.lib.retrieval import CHUNKS_FILE, EMBEDDINGS_FILE, Chunk

_COPY_ROWS = 50_000  # rows per step when copying vectors (bounded memory)


@dataclass(frozen=True)
class EncoderSpec:
    """What a worker needs to embed a shard (picklable): it loads the model once per process
    (`Embedder.load` caches it) on the same backend as the build, so every shard is embedded
    alike wherever it runs."""

    name: str
    backend: str
    store: StoreConfig | None
    batch_size: int

    def __call__(self, texts: list[str]) -> np.ndarray:
        store = ArtifactStore(self.store) if self.store is not None else None
        return Embedder.load(self.name, self.backend, store).encode(texts, self.batch_size)


def passage_hash(passage: str) -> str:
    """Identity of an embedding: the exact text the model sees (title + chunk)."""
    return hashlib.sha256(passage.encode()).hexdigest()


def default_workers(shards: int, cores: int) -> int:
    """Processes worth starting: none for one or two shards (a pool costs seconds to start)."""
    return 1 if shards <= 2 else max(1, min(cores, 8))


def _old_rows(store: ArtifactStore, previous: tuple[ArtifactRef, dict], dim: int, name: str):
    """(memmapped vectors, passage hash -> row) of the reuse source."""
    import pyarrow.parquet as pq

    ref, manifest = previous
    path = store.local_path(ref)
    old_vecs = np.load(path / EMBEDDINGS_FILE, mmap_mode="r")
    dims = {manifest.get("dimension"), old_vecs.shape[1]}
    if dims != {dim}:
        raise ModelError(
            f"rag: cannot reuse embeddings of rag artifact {ref.short}: dimension "
            f"{'/'.join(map(str, sorted(dims, key=str)))} != {dim} of embedder "
            f"{name!r}; that artifact is inconsistent: remove {ref.uri}"
        )
    old: dict[str, int] = {}
    row = 0
    for batch in pq.ParquetFile(path / CHUNKS_FILE, pre_buffer=False).iter_batches(
        columns=["title", "text"]
    ):
        t = batch.to_pydict()
        for title, text in zip(t["title"], t["text"], strict=True):
            old.setdefault(passage_hash(Chunk("", title, "", 0, 0, text, "").passage), row)
            row += 1
    return old_vecs, old


def _copy_rows(
    dst: np.ndarray, dst_rows: np.ndarray, src: np.ndarray, src_rows: np.ndarray
) -> None:
    """dst[dst_rows] = src[src_rows] in blocks, reading `src` in file order."""
    order = np.argsort(src_rows, kind="stable")
    for s in range(0, len(order), _COPY_ROWS):
        part = order[s : s + _COPY_ROWS]
        dst[dst_rows[part]] = src[src_rows[part]]


def embed_chunks(
    chunks: list[Chunk],
    encode: EncoderSpec,
    dim: int,
    out: Path,
    store: ArtifactStore,
    previous: tuple[ArtifactRef, dict] | None,
    shard_size: int,
    executor: Executor | None = None,
    window: int = 2,
) -> tuple[int, int]:
    """Write the vectors of `chunks` (rows in order) to `out` (a .npy file); returns
    (embedded, reused) chunk counts. `executor` None: shards run in this process."""
    vectors = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(len(chunks), dim))
    old_vecs, old = _old_rows(store, previous, dim, encode.name) if previous else (None, {})
    first: dict[str, int] = {}  # passage hash -> first row with it
    reuse_rows, reuse_from, dup_rows, dup_of = [], [], [], []
    for i, c in enumerate(chunks):
        h = passage_hash(c.passage)
        if h in old:
            reuse_rows.append(i)
            reuse_from.append(old[h])
        elif h in first:
            dup_rows.append(i)
            dup_of.append(first[h])
        else:
            first[h] = i
    del old
    if reuse_rows:
        _copy_rows(vectors, np.asarray(reuse_rows), old_vecs, np.asarray(reuse_from))
    rows = np.fromiter(first.values(), np.int64, len(first))
    del first
    shards = [rows[s : s + shard_size] for s in range(0, len(rows), shard_size)]

    items = ((part, [chunks[i].passage for i in part]) for part in shards)
    embed_shards(items, encode, vectors, executor, window)
    if dup_rows:
        _copy_rows(vectors, np.asarray(dup_rows), vectors, np.asarray(dup_of))
    vectors.flush()
    del vectors
    return len(rows) + len(dup_rows), len(reuse_rows)


def embed_shards(
    shards: Iterable[tuple[np.ndarray, list[str]]],
    encode: Callable[[list[str]], np.ndarray],
    vectors: np.ndarray,
    executor: Executor | None = None,
    window: int = 2,
) -> int:
    """vectors[rows] = encode(texts) for each (rows, texts) shard, at most `window` shards in
    flight (a shard's texts exist only while it is pending); returns the rows written."""
    written, dim = 0, vectors.shape[1]
    for part, vecs in ordered_map(_embed_shard(encode), shards, executor, window):
        if vecs.shape != (len(part), dim):
            raise ModelError(f"rag: a shard came back as {vecs.shape}, expected {(len(part), dim)}")
        vectors[part] = vecs
        written += len(part)
    return written


@dataclass(frozen=True)
class _embed_shard:  # noqa: N801 - a picklable closure
    encode: Callable[[list[str]], np.ndarray]

    def __call__(self, part: np.ndarray, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return part, self.encode(texts)
