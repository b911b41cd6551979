"""RAG at 100k and 1M chunks: sharded embedding (in-process vs a 2-worker Dask LocalCluster),
IVF-PQ build time and memory, index size, recall@10 vs exact search, query latency, BM25 build.

    python benchmarks/rag_scale.py [--sizes 100000 1000000] [--label LABEL]

What runs is the RAG stage's own code (fasttrack/lib/rag_shards.embed_shards into a memory-mapped
`embeddings.npy`, fasttrack/lib/retrieval.build_faiss with `index: ivfpq`, the Retriever's
re-scored IVF search fasttrack/lib/ann_index.search), minus chunking: the chunks are synthetic
(40-word passages from a 20k-word vocabulary, 10 per synthetic document, each document on one
of 1,000 topics: see `shard_texts`), generated shard by shard, never all at once.
The embedder is NOT a neural model: a hashing bag-of-words random projection to 384 dimensions
(`HashEmbedder`, seeded, unit-length rows), so 1M chunks embed in seconds; all-MiniLM-L6 on ONNX
int8 embeds ~100-300 chunks/s on these 2 cores, i.e. about 1-3 hours per million: there, the
embedding throughput scales with workers and the index/memory numbers below stay the same.
Queries: 1,000 chunks with 25% of their words replaced, embedded alike; recall@10 is measured
against exact (Flat) search over the same vectors. Memory: peak RSS of the process tree
(psutil, every 50 ms) and peak anonymous RSS (RssAnon: what the process owns, without the
memory-mapped `embeddings.npy` pages the kernel can drop), each minus the value at the phase start.
Results (with the 1-minute load average before and after) go to benchmarks/results/rag_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results/rag_scale.json"
DIM, BUCKETS, VOCAB, TOPICS, TOPIC_WORDS, WORDS = 384, 1 << 15, 20_000, 1_000, 200, 40
SHARD = 20_000


@dataclass(frozen=True)
class HashEmbedder:
    """Bag of words -> hashed buckets -> fixed random projection -> unit length (picklable)."""

    dim: int = DIM
    seed: int = 0

    def __call__(self, texts: list[str]) -> np.ndarray:
        import scipy.sparse as sp

        proj, bucket = _projection(self.dim, self.seed)
        ids = [bucket(w) for t in texts for w in t.split()]
        lens = np.fromiter((t.count(" ") + 1 for t in texts), np.int64, len(texts))
        indptr = np.concatenate([[0], np.cumsum(lens)])
        bow = sp.csr_matrix((np.ones(len(ids), np.float32), ids, indptr), (len(texts), BUCKETS))
        vecs = np.asarray(bow @ proj, dtype=np.float32)
        return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


_PROJ: dict = {}


def _projection(dim: int, seed: int):
    """(projection matrix, word -> bucket), made once per process."""
    if (dim, seed) not in _PROJ:
        import zlib

        proj = np.random.default_rng(seed).standard_normal((BUCKETS, dim), dtype=np.float32)
        memo: dict[str, int] = {}

        def bucket(word: str) -> int:
            b = memo.get(word)
            if b is None:
                b = memo[word] = zlib.crc32(word.encode()) % BUCKETS
            return b

        _PROJ[(dim, seed)] = proj, bucket
    return _PROJ[(dim, seed)]


WORD_LIST = [f"w{i:x}" for i in range(VOCAB)]


def shard_texts(start: int, size: int, seed: int = 7) -> list[str]:
    """Chunks start..start+size-1, a function of their row numbers only. Like chunks of real
    documents: 10 consecutive chunks form a document; half of a chunk's 40 words come from its
    document's 30, a quarter from its topic's 200 (1,000 topics), a quarter from anywhere."""
    rng = np.random.default_rng([seed, start])
    rows = np.arange(start, start + size)
    doc = rows // 10
    topic = (doc * 2_654_435_761) % TOPICS
    pick = rng.random((size, WORDS))
    doc_w = (doc[:, None] * 40_503 + rng.integers(0, 30, (size, WORDS)) * 7_919) % VOCAB
    topic_w = (
        topic[:, None] * 7_919 + rng.integers(0, TOPIC_WORDS, (size, WORDS)) * 104_729
    ) % VOCAB
    words = np.where(pick < 0.5, doc_w, topic_w)
    noise = pick >= 0.75
    words[noise] = rng.integers(0, VOCAB, int(noise.sum()))
    return [" ".join(map(WORD_LIST.__getitem__, row)) for row in words.tolist()]


def shards(n: int):
    for start in range(0, n, SHARD):
        size = min(SHARD, n - start)
        yield np.arange(start, start + size), shard_texts(start, size)


class Peak:
    """Peak process-tree RSS and anonymous RSS (MB) above the values at entry."""

    def __init__(self) -> None:
        self.rss = self.anon = 0.0
        self._stop = threading.Event()

    @staticmethod
    def sample() -> tuple[float, float]:
        me = psutil.Process()
        rss = anon = 0.0
        for p in [me, *me.children(recursive=True)]:
            try:
                rss += p.memory_info().rss
                with open(f"/proc/{p.pid}/status") as f:
                    anon += next(int(x.split()[1]) * 1024 for x in f if x.startswith("RssAnon"))
            except (psutil.Error, OSError, StopIteration):
                pass
        return rss / 1e6, anon / 1e6

    def __enter__(self) -> Peak:
        self.base = self.sample()
        self.peak = list(self.base)
        self.t0 = time.perf_counter()

        def run() -> None:
            while not self._stop.wait(0.05):
                self.peak = [max(a, b) for a, b in zip(self.peak, self.sample(), strict=True)]

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        self.peak = [max(a, b) for a, b in zip(self.peak, self.sample(), strict=True)]

    def report(self) -> dict:
        return {
            "seconds": round(self.seconds, 2),
            "peak_rss_mb_process_tree": round(self.peak[0] - self.base[0]),
            "peak_anon_rss_mb_process_tree": round(self.peak[1] - self.base[1]),
        }


def embed(n: int, path: Path, engine: str) -> dict:
    from benchmarks.rag_scale import HashEmbedder as embedder  # not __main__: see main()
    from fasttrack.core.config_loader import load_config
    from fasttrack.lib.pools import worker_pool
    from fasttrack.lib.rag_shards import embed_shards
    from tests.conftest import tiny_config_dict, write_config

    cfg_path = write_config(path.with_suffix(".yaml"), tiny_config_dict(path.parent / "store"))
    cfg = load_config(cfg_path)
    vectors = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, DIM))
    with Peak() as peak, worker_pool(cfg, engine, 2 if engine == "dask" else 1) as (pool, w):
        t0 = time.perf_counter()
        embed_shards(shards(n), embedder(), vectors, pool, window=2 * w)
        vectors.flush()
        seconds = time.perf_counter() - t0
    del vectors
    return {
        "engine": engine, "workers": w, "shard_size": SHARD,
        "chunks_per_s": round(n / seconds), "seconds_without_cluster_start": round(seconds, 2),
        **{k: v for k, v in peak.report().items() if k != "seconds"},
    }  # fmt: skip


def measure(n: int, tmp: Path) -> dict:
    import faiss

    from fasttrack.core.config_eval import RagConfig
    from fasttrack.lib import ann_index
    from fasttrack.lib.retrieval import build_bm25, build_faiss

    load_before = os.getloadavg()
    out: dict = {"chunks": n, "loadavg_1_5_15_before": [round(x, 2) for x in load_before]}
    path = tmp / f"emb-{n}.npy"
    out["embed"] = [embed(n, path, "local"), embed(n, tmp / f"emb-{n}-dask.npy", "dask")]
    same = np.array_equal(
        np.load(path, mmap_mode="r"), np.load(tmp / f"emb-{n}-dask.npy", mmap_mode="r")
    )
    out["embed_dask_equals_local"] = bool(same)
    (tmp / f"emb-{n}-dask.npy").unlink()
    vectors = np.load(path, mmap_mode="r")
    with Peak() as peak:
        index, info = build_faiss(vectors, RagConfig(index="ivfpq"))
    faiss.write_index(index, str(tmp / "index.faiss"))
    out["index"] = {
        **info, **peak.report(), "size_mb": round((tmp / "index.faiss").stat().st_size / 1e6, 1),
        "embeddings_mb": round(path.stat().st_size / 1e6, 1),
    }  # fmt: skip
    rng = np.random.default_rng(11)
    rows = np.sort(rng.choice(n, 1000, replace=False))
    texts = []
    for r in rows:  # the chunk with a quarter of its words replaced
        words = shard_texts(int(r), 1)[0].split()
        for j in rng.choice(len(words), len(words) // 4, replace=False):
            words[j] = WORD_LIST[int(rng.integers(VOCAB))]
        texts.append(" ".join(words))
    queries = HashEmbedder()(texts)
    t0 = time.perf_counter()
    exact = ann_index.exact_search(vectors, queries, 10)[1]
    flat_s = time.perf_counter() - t0
    lat = []
    found: list[np.ndarray] = []
    for q in queries:
        t = time.perf_counter()
        found.append(ann_index.search(index, vectors, q[None, :], 10)[1][0])
        lat.append(time.perf_counter() - t)
    pq_only = index.search(queries, 10)[1]
    out["queries"] = {
        "queries": len(queries), "nprobe": index.nprobe,
        "recall@10_vs_exact": round(ann_index.recall_at(np.array(found), exact), 4),
        "recall@10_pq_scores_without_rescoring": round(ann_index.recall_at(pq_only, exact), 4),
        "source_chunk_in_top10": round(float(np.mean(np.array(found) == rows[:, None]) * 10), 4),
        "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 2),
        "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 2),
        "exact_flat_batch_of_1000_s": round(flat_s, 2),
    }  # fmt: skip
    del index, vectors
    path.unlink()
    with Peak() as peak:  # what the stage uses today for BM25: bm25s (scipy sparse inside)
        bm25 = build_bm25([t for _, part in shards(n) for t in part])
        bm25.save(str(tmp / "bm25"), show_progress=False)
    size = sum(f.stat().st_size for f in (tmp / "bm25").iterdir())
    out["bm25s"] = {**peak.report(), "size_mb": round(size / 1e6, 1)}
    del bm25
    out["loadavg_1_5_15_after"] = [round(x, 2) for x in os.getloadavg()]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--label", default="quiet")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # HashEmbedder must travel to Dask workers by reference (by value, cloudpickle would ship
    # this module's globals), so they import this file as benchmarks.rag_scale too
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
    )
    sys.path.insert(0, str(ROOT))
    from benchmarks.rag_scale import measure as run

    runs = []
    with tempfile.TemporaryDirectory(prefix="rag-scale-") as tmp:
        for n in args.sizes:
            runs.append(run(n, Path(tmp)))
            print(json.dumps(runs[-1]), flush=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[args.label] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "embedder": "HashEmbedder: hashing bag-of-words random projection (not a neural model)",
        "runs": runs,
    }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
