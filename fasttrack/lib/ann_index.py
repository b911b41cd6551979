"""IVF-PQ for corpora too large for exact or HNSW search, built with bounded memory.

Why not `index.train(all) + index.add(all)`: that needs every vector in RAM (1M x 384 float32 is
1.5 GB, plus faiss's copies). Here k-means and the PQ codebooks train on a seeded sample, the
vectors are added shard by shard from the memory-mapped `embeddings.npy`, so peak memory is the
sample + one shard + the compressed index. PQ codes are lossy, so a search takes RERANK x more
candidates and re-scores them exactly against the memory-mapped vectors (no second copy in
RAM); nprobe is the smallest power of two whose recall@10 against exact search reaches
`rag.ivf_recall` on sampled chunks used as queries (recorded in the manifest).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

RERANK = 4  # PQ candidates per wanted hit that are re-scored exactly
PLATEAU = 0.002  # recall gain below which doubling nprobe stops (it only costs latency)
TUNE_QUERIES, TUNE_K = 1000, 10
_BLOCK = 50_000  # rows per shard-wise add
_SCAN = 10_000  # rows per step of an exact scan


def ivfpq_params(n: int, train: int, d: int, nlist: int | None, pq_m: int) -> tuple[int, int, int]:
    """(nlist, pq_m, nbits) for `n` vectors, `train` of them sampled for training: k-means
    needs >= ~39 training points per cell and PQ >= 2**nbits, so small corpora get fewer cells
    and smaller codebooks instead of a crash; pq_m must divide the dimension."""
    nlist = min(nlist or round(4 * math.sqrt(n)), max(1, train // 39))
    nbits = max(1, min(8, int(math.log2(max(train, 2)))))
    pq_m = max(m for m in range(1, min(pq_m, d) + 1) if d % m == 0)
    return nlist, pq_m, nbits


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted row numbers of a seeded sample (sorted: memory-mapped reads in file order)."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def build_ivfpq(
    vectors: np.ndarray, nlist: int | None, pq_m: int, train_size: int, recall: float, seed: int
) -> tuple[Any, dict[str, Any]]:
    """(trained and filled IndexIVFPQ, its parameters + tuned nprobe for the manifest).
    `vectors` may be a read-only memmap: only samples and blocks of it are read into RAM."""
    import faiss

    n, d = vectors.shape
    train = sample_rows(n, train_size, seed)
    nlist, pq_m, nbits = ivfpq_params(n, len(train), d, nlist, pq_m)
    index = faiss.IndexIVFPQ(
        faiss.IndexFlatIP(d), d, nlist, pq_m, nbits, faiss.METRIC_INNER_PRODUCT
    )
    index.cp.seed = index.pq.cp.seed = seed  # k-means seeds: the same index on every machine
    index.train(np.ascontiguousarray(vectors[train], dtype=np.float32))
    for start in range(0, n, _BLOCK):
        index.add(np.ascontiguousarray(vectors[start : start + _BLOCK], dtype=np.float32))
    queries = np.ascontiguousarray(vectors[sample_rows(n, TUNE_QUERIES, seed + 1)], np.float32)
    k = min(TUNE_K, n)
    exact = exact_search(vectors, queries, k)[1]
    nprobe, got, best = 1, 0.0, (1, -1.0)
    while True:
        index.nprobe = nprobe
        got = recall_at(search(index, vectors, queries, k)[1], exact)
        if got >= recall or nprobe >= nlist:
            break
        if got <= best[1] + PLATEAU:  # more cells no longer help: PQ error is the limit now
            nprobe, got = best
            break
        best = (nprobe, got)
        nprobe = min(2 * nprobe, nlist)
    index.nprobe = nprobe
    info = {
        "nlist": nlist, "pq_m": pq_m, "nbits": nbits, "nprobe": nprobe, "rerank": RERANK,
        "train_rows": len(train), "tune_queries": len(queries), f"recall@{TUNE_K}": round(got, 4),
    }  # fmt: skip
    return index, info


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the exact top-k inner products, best first (ties: lower id), scanning
    `vectors` in blocks (a few tens of MB of scores at a time)."""
    best_s = np.zeros((len(queries), 0), np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(vectors), _SCAN):
        block = np.asarray(vectors[start : start + _SCAN], dtype=np.float32)
        s = queries @ block.T
        top = np.argpartition(-s, min(k, s.shape[1]) - 1, axis=1)[:, :k]
        s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], axis=1)
        i = np.concatenate([best_i, top + start], axis=1)
        keep = np.argpartition(-s, min(k, s.shape[1]) - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
    order = np.lexsort((best_i, -best_s), axis=-1)
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


def search(
    index: Any, vectors: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), best first: the index's top RERANK*k candidates re-scored exactly against
    `vectors` (memory-mapped rows), missing slots as id -1 like faiss."""
    wide = min(index.ntotal, RERANK * k)
    _, cand = index.search(queries, wide)
    scores = np.full((len(queries), k), -np.inf, np.float32)
    ids = np.full((len(queries), k), -1, np.int64)
    for q, row in enumerate(cand):
        row = row[row >= 0]
        if not len(row):
            continue
        rows = np.sort(row)
        s = np.asarray(vectors[rows], dtype=np.float32) @ queries[q]
        top = np.lexsort((rows, -s))[:k]
        scores[q, : len(top)], ids[q, : len(top)] = s[top], rows[top]
    return scores, ids


def recall_at(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each query's exact top-k that `found` contains."""
    hits = [
        len(set(f[f >= 0]) & set(e)) / max(1, len(e)) for f, e in zip(found, exact, strict=True)
    ]
    return float(np.mean(hits)) if hits else 1.0
