"""RAG at scale: sharded embedding (keys and vectors independent of shard size and workers) and
the IVF-PQ index (trained on a sample, filled shard by shard, nprobe tuned, exact re-scoring)."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from fasttrack.core.config_eval import RagConfig
from fasttrack.lib import ann_index, retrieval
from fasttrack.lib.rag_shards import embed_shards
from tasks.rag import build_index, rag_spec
from tests.unit.test_rag import DOCS, _cfg, _write_docs


def _clustered(n: int, d: int = 64, seed: int = 0) -> np.ndarray:
    """Unit vectors shaped like chunk embeddings: 5 chunks per document around its centre,
    documents around 50 topic centres."""
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((50, d)).astype(np.float32)
    docs = topics[rng.integers(0, 50, n // 5)] + 0.7 * rng.standard_normal((n // 5, d))
    v = np.repeat(docs, 5, axis=0) + 0.4 * rng.standard_normal((n, d))
    v = v.astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_ivfpq_trains_on_a_sample_and_finds_the_chunk_a_query_was_copied_from(
    tmp_path: Path, monkeypatch
) -> None:
    """5k vectors with `index: auto`'s threshold lowered to 4k: IVF-PQ, k-means on a 1k sample,
    vectors added from a read-only memmap, nprobe tuned to recall@10 >= 0.9 vs exact search; a
    query copied from a chunk finds that chunk first (PQ scores alone often do not)."""
    monkeypatch.setattr(retrieval, "FLAT_MAX", 1_000)
    monkeypatch.setattr(retrieval, "HNSW_MAX", 4_000)
    np.save(tmp_path / "v.npy", _clustered(5_000))
    vectors = np.load(tmp_path / "v.npy", mmap_mode="r")
    index, info = retrieval.build_faiss(vectors, RagConfig(ivf_train_size=1_000, pq_m=8))
    assert type(index) is faiss.IndexIVFPQ and index.ntotal == 5_000
    assert info["type"] == "ivfpq" and info["train_rows"] == 1_000
    assert info["recall@10"] >= 0.9 and 1 <= info["nprobe"] <= info["nlist"]
    rows = np.arange(0, 5_000, 50)
    queries = np.ascontiguousarray(vectors[rows])
    _, ids = ann_index.search(index, vectors, queries, 10)
    assert (ids[:, 0] == rows).mean() >= 0.98
    exact = ann_index.exact_search(vectors, queries, 10)[1]
    assert (exact[:, 0] == rows).all()
    assert ann_index.recall_at(ids, exact) >= 0.9
    again, info2 = retrieval.build_faiss(vectors, RagConfig(ivf_train_size=1_000, pq_m=8))
    assert info2 == info  # seeded: the same index from the same vectors
    assert (again.search(queries, 5)[1] == index.search(queries, 5)[1]).all()


def test_shards_land_in_their_rows_whatever_the_shard_order(tmp_path: Path) -> None:
    """Rows are decided before shards run: shards given out of order fill the same file."""
    out = np.lib.format.open_memmap(tmp_path / "e.npy", mode="w+", dtype=np.float32, shape=(7, 3))

    def encode(texts: list[str]) -> np.ndarray:
        return np.array([[float(t), 2 * float(t), 1.0] for t in texts], np.float32)

    shards = [(np.array([4, 5, 6]), ["4", "5", "6"]), (np.array([0, 1, 2, 3]), list("0123"))]
    assert embed_shards(iter(shards), encode, out) == 7
    assert (out[:, 0] == np.arange(7)).all() and (out[:, 1] == 2 * np.arange(7)).all()


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_key_and_vectors_do_not_depend_on_shard_size(tmp_path: Path) -> None:
    """Shards of 3 chunks vs one shard (the Dask test varies the workers): the same key,
    chunks and (to float rounding of batch padding) vectors; the manifest records the schedule."""
    docs = str(_write_docs(tmp_path / "docs", DOCS))
    kw = {"documents": docs, "chunk": {"size_tokens": 32, "overlap_tokens": 8}, "index": "flat",
          "embedder_backend": "torch"}  # fmt: skip
    one = _cfg(tmp_path, "s1", **kw)
    many = _cfg(tmp_path, "s2", shard_size=3, workers=1, **kw)
    assert rag_spec(one).key == rag_spec(many).key
    a, b = build_index(one), build_index(many)
    assert a.key == b.key and not b.reused and b.metrics["chunks"] > 6
    va, vb = (np.load(Path(r.uri) / "embeddings.npy") for r in (a, b))
    assert va.shape == vb.shape and _cos(va, vb).min() > 0.9999
    from fasttrack.core.store import ArtifactStore

    manifest = ArtifactStore(many.store).read_manifest("rag", b.key)
    assert manifest["embedding"] == {"engine": "local", "workers": 1, "shard_size": 3}


@pytest.mark.parametrize("field,value", [("shard_size", 0), ("workers", 0), ("engine", "ray")])
def test_bad_schedule_values_name_the_field(tmp_path: Path, field: str, value: object) -> None:
    from fasttrack.core.errors import FastTrackError

    with pytest.raises(FastTrackError, match=f"rag.{field}"):
        _cfg(tmp_path, **{field: value})
