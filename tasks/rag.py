"""RAG stage: documents -> token chunks -> embeddings -> FAISS + BM25 indexes -> retrieval metrics.

Output artifact: `index.faiss` (stock FAISS, ids = rows of `chunks.parquet`), `chunks.parquet`
(chunk_id, doc_id, title, section, start, end, text, doc_hash), `embeddings.npy`, `bm25/` (bm25s)
and `metrics.json`. Embedding is the expensive part, so it is incremental: artifacts with the same
chunk config, embedder fingerprint and embedder backend form a *family*, and a new corpus embeds
only passages whose sha256 is not in the newest artifact of its family (the others' vectors are
copied: the artifact equals a full rebuild's, and its key does not depend on what was reused).
The build also measures recall@k / MRR of dense, BM25 and hybrid retrieval on held-out
questions whose source document is known.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from fasttrack.core import faultpoint
from fasttrack.core.config import RunConfig
from fasttrack.core.errors import DataError
from fasttrack.core.log import get_logger
from fasttrack.core.stage import BuildResult, Stage, StageSpec
from fasttrack.core.store import ArtifactRef, ArtifactStore, canonical_json
from fasttrack.lib.datasets import read_split
from fasttrack.lib.documents import documents_hash, load_documents
from fasttrack.lib.evalstats import RANKS_FILE
from fasttrack.lib.pools import worker_pool
from fasttrack.lib.rag_eval import eval_set_hash, load_eval_set
from fasttrack.lib.rag_shards import EncoderSpec, default_workers, embed_chunks
from fasttrack.lib.retrieval import (
    BM25_DIR,
    CHUNKS_FILE,
    EMBEDDINGS_FILE,
    INDEX_FILE,
    MODES,
    Chunk,
    Embedder,
    Retriever,
    build_bm25,
    build_faiss,
    chunk_document,
    resolve_embedder,
)

# 2: ranks.json (per-question ranks: recall@k intervals); 3: IVF-PQ trained on a sample, filled
# shard by shard, nprobe tuned to rag.ivf_recall, exact re-scoring of its candidates
STAGE = Stage("rag", "4")  # 4: default embedder backend openvino-bf16
EVAL_SPLITS = ("validation", "test")
# Query-time knobs: they change no file of the artifact, so they are not part of its key.
_QUERY_ONLY = {"enabled", "batch_size", "mode", "top_k", "answer"}
_SCHEDULE = {"engine", "workers", "shard_size"}  # where and in what pieces: same vectors


def family_of(cfg: RunConfig, embedder_hash: str) -> str:
    """Artifacts whose vectors are interchangeable: same embedder on the same backend (and
    the same chunking: a rebuild with another one reuses little)."""
    payload = {
        "version": STAGE.version,
        "chunk": cfg.rag.chunk.model_dump(),
        "embedder": embedder_hash,
        "backend": cfg.rag.embedder_backend,
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def rag_spec(cfg: RunConfig, data: ArtifactRef | None = None) -> StageSpec:
    rag = cfg.rag
    _, embedder_hash = resolve_embedder(rag.embedder)
    inputs = {"embedder": embedder_hash}
    if rag.documents:
        inputs["documents"] = documents_hash(Path(rag.documents).expanduser())
    elif data is None:
        raise DataError(
            "rag: nothing to index: run the data stage (its corpus) or set rag.documents"
        )
    if rag.eval is not None:  # the user's eval set: its bytes are part of the key
        inputs["eval_set"] = eval_set_hash(rag.eval)
    exclude = (
        _QUERY_ONLY | _SCHEDULE | ({"eval"} if rag.eval is None else set())
    )  # keys stay as they were
    config = rag.model_dump(mode="json", exclude=exclude)
    upstream = {"data": data} if data is not None else {}
    return STAGE.spec(config, upstream=upstream, inputs=inputs)


def previous_in_family(
    store: ArtifactStore, family: str, key: str
) -> tuple[ArtifactRef, dict] | None:
    """The newest complete rag artifact of `family` other than `key` (the reuse source)."""
    found = [m for m in store.manifests() if m["stage"] == "rag" and m.get("family") == family]
    newest = sorted(found, key=lambda m: (m.get("created_at", ""), m.get("built_at", 0.0)))
    for m in reversed(newest):
        if m["key"] != key and (ref := store.lookup("rag", m["key"])) is not None:
            return ref, m
    return None


def eval_questions(
    store: ArtifactStore, data: ArtifactRef | None, titles: set[str]
) -> list[tuple[str, str]]:
    """(question, source title) of held-out SFT rows whose source document is indexed."""
    if data is None:
        return []
    out = []
    for split in EVAL_SPLITS:
        try:
            rows = read_split(store, data, "sft", split)
        except DataError:
            return []  # no SFT data: nothing to evaluate against
        for r in rows:
            user = next((m["content"] for m in r["messages"] if m["role"] == "user"), None)
            if user and r.get("source") in titles:
                out.append((user, r["source"]))
    return out


def evaluate_retrieval(
    retriever: Retriever, questions: list[tuple[str, str]], ks: list[int]
) -> tuple[dict[str, float], int, dict[str, list[int | None]]]:
    """(`<mode>.recall@<k>` and `<mode>.mrr` on document level, ranking depth, each mode's rank
    of the expected document per question: None = not retrieved). A document is
    ranked by its best chunk; a hit is a document whose title or id (a path under
    rag.documents, or the row's `id`) is the question's source."""
    ks = sorted(set(ks))
    depth = min(len(retriever), max(100, 10 * max(ks)))
    if not questions:
        return {}, depth, {}
    ranked = retriever.rank([q for q, _ in questions], depth)
    doc_of, title_of = retriever.chunks["doc_id"], retriever.chunks["title"]
    metrics: dict[str, float] = {}
    all_ranks: dict[str, list[int | None]] = {}
    for mode in MODES:
        ranks: list[int | None] = all_ranks.setdefault(mode, [])
        for (_, source), hits in zip(questions, ranked[mode], strict=True):
            seen: set[str] = set()
            rank = None
            for chunk_id, _ in hits:
                if doc_of[chunk_id] in seen:
                    continue
                seen.add(doc_of[chunk_id])
                if source in (title_of[chunk_id], doc_of[chunk_id]):
                    rank = len(seen)
                    break
            ranks.append(rank)
        for k in ks:
            metrics[f"{mode}.recall@{k}"] = round(
                float(np.mean([bool(r and r <= k) for r in ranks])), 4
            )
        metrics[f"{mode}.mrr"] = round(float(np.mean([1 / r if r else 0.0 for r in ranks])), 4)
    return metrics, depth, all_ranks


def write_chunks(path: Path, chunks: list[Chunk]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"chunk_id": i, **c.__dict__} for i, c in enumerate(chunks)]
    pq.write_table(pa.Table.from_pylist(rows), path)


def build_rag(cfg: RunConfig, spec: StageSpec, out: Path) -> BuildResult:
    import faiss

    rag, store, log = cfg.rag, ArtifactStore(cfg.store), get_logger()
    data = spec.upstream.get("data")
    docs, skipped = load_documents(cfg, store, data)
    embedder = Embedder.load(rag.embedder, rag.embedder_backend, store)
    limit = embedder.model.max_seq_length
    if rag.chunk.size_tokens + 16 > limit:
        log.warning(
            "rag.chunk.size_tokens (%d) + title is close to or above the embedder's window "
            "(%d tokens): the model truncates longer passages", rag.chunk.size_tokens, limit
        )  # fmt: skip
    size, overlap = rag.chunk.size_tokens, rag.chunk.overlap_tokens
    per_doc = [
        chunk_document(d, embedder.tokenizer, size, overlap, rag.chunk.markdown_aware) for d in docs
    ]
    chunks = [c for group in per_doc for c in group]
    if not chunks:
        raise DataError(f"rag: the corpus is empty: {len(docs)} documents, none with text to index")
    family = family_of(cfg, embedder.fingerprint)
    previous = previous_in_family(store, family, spec.key)
    t0 = time.perf_counter()
    shards = -(-len(chunks) // rag.shard_size)
    workers = rag.workers or default_workers(shards, os.cpu_count() or 1)
    encode = EncoderSpec(rag.embedder, rag.embedder_backend, cfg.store, rag.batch_size)
    with worker_pool(cfg, rag.engine, workers) as (pool, workers):
        embedded, reused = embed_chunks(
            chunks, encode, embedder.dim, out / EMBEDDINGS_FILE, store, previous,
            rag.shard_size, pool, window=2 * workers,
        )  # fmt: skip
    embed_s = round(time.perf_counter() - t0, 3)
    log.info("rag: %d chunks, %d embedded, %d reused", len(chunks), embedded, reused)

    vectors = np.load(out / EMBEDDINGS_FILE, mmap_mode="r")
    index, info = build_faiss(vectors, rag)
    faiss.write_index(index, str(out / INDEX_FILE))
    faultpoint.reached("rag:index-written")  # embedded, half the files written
    del index, vectors
    write_chunks(out / CHUNKS_FILE, chunks)
    build_bm25([c.passage for c in chunks]).save(str(out / BM25_DIR), show_progress=False)

    # reloads what was written: the query path
    retriever = Retriever(rag, out, embedder, rag.embedder_backend, store)
    if rag.eval is not None:
        questions = load_eval_set(rag.eval, cfg.data.encoding)
        asked = f"rows of rag.eval ({rag.eval.path})"
    else:
        questions = eval_questions(store, data, {d.title for d in docs})
        asked = f"user turn of sft {'+'.join(EVAL_SPLITS)} rows whose source is indexed"
    scores, depth, ranks = evaluate_retrieval(retriever, questions, rag.eval_ks)
    (out / RANKS_FILE).write_text(json.dumps(ranks))
    metrics: dict[str, Any] = {
        "documents": len(docs),
        "chunks": len(chunks),
        "embedded_chunks": embedded,
        "reused_chunks": reused,
        "skipped_documents": len(skipped),
        "eval_questions": len(questions),
        **scores,
    }
    protocol = {
        "questions": asked,
        "hit": "a retrieved chunk whose document title, path or id == the expected source",
        "ranking": "documents ranked by their best chunk",
        "depth": depth,
        "rrf_k": rag.rrf_k,
    }
    (out / "metrics.json").write_text(json.dumps({**metrics, "protocol": protocol}, indent=2))
    extra = {
        "family": family,
        "built_at": time.time(),  # created_at has 1 s resolution; "newest" must be exact
        "embedder": rag.embedder,
        "embedder_path": str(embedder.path),
        "embedder_hash": embedder.fingerprint,
        "embedder_backend": embedder.backend,
        "dimension": embedder.dim,
        "index_type": info["type"],
        "index": info,
        "reused_from": previous[0].key if previous else None,
        "embed_s": embed_s,  # reuse lookup + embedding (benchmarks/rag_incremental.py)
        "embedding": {"engine": rag.engine, "workers": workers, "shard_size": rag.shard_size},
        "skipped": skipped,
        "protocol": protocol,
    }
    return BuildResult(metrics=metrics, device={"device": embedder.device}, extra=extra)


build_index, rag_task = STAGE.define(rag_spec, build_rag)
