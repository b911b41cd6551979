"""Retrieval building blocks: token chunking, sentence embeddings, FAISS/BM25 indexes, RRF fusion.

Why here and not in the stage (tasks/rag.py): the same code must chunk and embed at build time and
embed and search at query time, so a query can never be answered by a differently built pipeline.
Chunks are cut on the *embedder's* tokens (so a chunk never overflows the model's window) but
stored as exact character spans of the document, so every hit can be traced back and verified.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fasttrack.core.config import RunConfig
from fasttrack.core.config_eval import RagConfig
from fasttrack.core.errors import ModelError, StoreError
from fasttrack.core.log import get_logger
from fasttrack.core.store import ArtifactRef, ArtifactStore
from fasttrack.lib.embedder import Embedder, resolve_embedder  # moved there; importable here

IndexType = Literal["flat", "hnsw", "ivfpq"]
FLAT_MAX, HNSW_MAX = 50_000, 1_000_000  # `index: auto` thresholds (number of chunks)
IVF_SEED = (
    1234  # k-means / PQ training sample and seeds: fixed, so the index is a function of the vectors
)
_SNAP_TOKENS = 16  # how far a cut may move back to land between words

_ATX = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t#]*$")
_SETEXT = re.compile(r"^ {0,3}(={3,}|-{3,}|\*{3,}|~{3,})[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")


@dataclass(frozen=True)
class Document:
    doc_id: str
    title: str
    text: str

    @functools.cached_property
    def hash(self) -> str:
        """Identity for incremental re-embedding: title and text are both embedded."""
        return hashlib.sha256(f"{self.title}\0{self.text}".encode()).hexdigest()


@dataclass(frozen=True)
class Chunk:
    doc_id: str
    title: str
    section: str
    start: int  # character offsets into the document text: text == doc.text[start:end]
    end: int
    text: str
    doc_hash: str

    @property
    def passage(self) -> str:
        """What is embedded and BM25-indexed: the chunk, headed by its document title when the
        chunk does not already start with it (later chunks of a document lose its name)."""
        if self.title and not self.text.startswith(self.title):
            return f"{self.title}\n\n{self.text}"
        return self.text


# ---- chunking ------------------------------------------------------------------------------
def headings(text: str) -> list[tuple[int, str]]:
    """(char offset of the line, heading text) of ATX (`# x`) and setext (`x` over `===`)
    headings, ignoring fenced code blocks (a `# comment` in code is not a heading). Fences
    follow CommonMark: a ```` fence is not closed by ```, nor ``` by ~~~; a fence left open
    ends with its document (each document is parsed on its own)."""
    out: list[tuple[int, str]] = []
    lines = text.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    fence = ""  # the open fence (CommonMark: closed only by the same char, at least as long)
    for i, raw in enumerate(lines):
        line = raw.rstrip("\r\n")
        if f := _FENCE.match(line):
            marks, rest = f.groups()
            if not fence and not (marks[0] == "`" and "`" in rest):
                fence = marks
                continue
            if fence and marks[0] == fence[0] and len(marks) >= len(fence) and not rest.strip():
                fence = ""
                continue
        if fence or not line.strip():
            continue
        elif m := _ATX.match(line):
            out.append((starts[i], m.group(1).strip()))
        elif (
            i + 1 < len(lines)
            and _SETEXT.match(lines[i + 1].rstrip("\r\n"))
            and not _SETEXT.match(line)
            and (i == 0 or not lines[i - 1].strip())
        ):
            out.append((starts[i], line.strip()))
    return out


def _snap(spans: list[tuple[int, int]], j: int, lo: int) -> int:
    """Move cut `j` back (not below `lo`) to a token that starts a word; keep `j` if none."""
    for cand in range(j, max(lo, j - _SNAP_TOKENS), -1):
        if spans[cand][0] > spans[cand - 1][1]:
            return cand
    return j


def chunk_document(
    doc: Document, tokenizer: Any, size: int, overlap: int, markdown: bool = True
) -> list[Chunk]:
    """Windows of at most `size` embedder tokens sharing at least `overlap` tokens with the
    previous one (cuts move back, a few tokens at most, to the start of a word); with
    `markdown`, a window that would cross headings ends at the last of them and the next
    window starts there, without overlap (small sections share a chunk, big ones start one)."""
    enc = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    spans = [(int(s), int(e)) for s, e in enc["offset_mapping"] if e > s]
    n = len(spans)
    if n == 0:
        return []
    heads = headings(doc.text) if markdown else []
    head_chars = [h for h, _ in heads]
    token_starts = [s for s, _ in spans]
    cuts = sorted({bisect_left(token_starts, h) for h in head_chars} - {0, n})
    out: list[Chunk] = []
    i = 0
    while True:
        end, nxt = min(i + size, n), None
        if end < n:
            inside = [h for h in cuts if i < h <= end]
            if inside:
                end = nxt = inside[-1]
            else:
                end = _snap(spans, end, i + 1)
        start_c, end_c = spans[i][0], spans[end - 1][1]
        k = bisect_right(head_chars, start_c)
        section = heads[k - 1][1] if k else ""
        out.append(
            Chunk(doc.doc_id, doc.title, section, start_c, end_c, doc.text[start_c:end_c], doc.hash)
        )
        if end >= n:
            return out
        i = nxt if nxt is not None else _snap(spans, max(end - overlap, i + 1), i + 1)


# ---- dense index ---------------------------------------------------------------------------
def choose_index(n: int, requested: str) -> IndexType:
    """`auto`: exact search while it is cheap, HNSW up to a million, compressed IVF-PQ beyond."""
    if requested != "auto":
        return requested  # type: ignore[return-value]
    return "flat" if n < FLAT_MAX else "hnsw" if n < HNSW_MAX else "ivfpq"


def build_faiss(vectors: np.ndarray, rag: RagConfig) -> tuple[Any, dict[str, Any]]:
    """(index over `vectors` with ids = row numbers, its parameters for the manifest)."""
    import faiss

    n, d = vectors.shape
    kind = choose_index(n, rag.index)
    info: dict[str, Any] = {"type": kind, "metric": "inner_product"}
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, rag.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = rag.hnsw_ef_construction
        index.hnsw.efSearch = rag.hnsw_ef_search
        info |= {"m": rag.hnsw_m, "ef_construction": rag.hnsw_ef_construction,
                 "ef_search": rag.hnsw_ef_search}  # fmt: skip
    else:  # trained on a sample, filled shard by shard: memory ~ index + one shard
        from fasttrack.lib.ann_index import build_ivfpq

        index, params = build_ivfpq(
            vectors, rag.ivf_nlist, rag.pq_m, rag.ivf_train_size, rag.ivf_recall, IVF_SEED
        )
        return index, info | params
    for start in range(0, n, 50_000):  # a memmap is read block by block
        index.add(np.ascontiguousarray(vectors[start : start + 50_000], dtype=np.float32))
    return index, info


# ---- BM25 and fusion -----------------------------------------------------------------------
def _bm25s() -> Any:
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.INFO)  # bm25s sets DEBUG on import: log noise
    return bm25s


def bm25_tokens(texts: list[str]) -> list[list[str]]:
    """Lower-cased word tokens minus English stopwords (`abc.abstractmethod` -> abc,
    abstractmethod); the same function tokenizes documents and queries."""
    return _bm25s().tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


def build_bm25(passages: list[str]) -> Any:
    index = _bm25s().BM25()
    index.index(bm25_tokens(passages), show_progress=False)
    return index


def rrf(rankings: list[list[int]], k: int) -> list[tuple[int, float]]:
    """Reciprocal-rank fusion: score(id) = sum over rankings of 1 / (k + rank), rank from 1.
    Rank-based, so cosine and BM25 scores need no calibration against each other."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, idx in enumerate(ranking, 1):
            scores[idx] = scores.get(idx, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))


# ---- query side ----------------------------------------------------------------------------
MODES = ("dense", "bm25", "hybrid")
RRF_DEPTH = 50  # candidates taken from each ranking before fusion
INDEX_FILE, CHUNKS_FILE, EMBEDDINGS_FILE, BM25_DIR = (
    "index.faiss", "chunks.parquet", "embeddings.npy", "bm25",
)  # fmt: skip


@dataclass(frozen=True)
class Hit:
    chunk_id: int  # row of chunks.parquet = FAISS id
    doc_id: str
    title: str
    section: str
    text: str
    score: float  # cosine (dense), BM25 score (bm25) or RRF score (hybrid)
    rank: int  # from 1


class Retriever:
    """The query side of a rag artifact: the index files plus the embedder they were built with."""

    def __init__(
        self,
        rag: RagConfig,
        path: Path,
        embedder: Embedder | None = None,
        backend: str = "torch",
        store: ArtifactStore | None = None,
    ):
        """`backend`: the one the index was built with (its manifest's `embedder_backend`):
        queries must be embedded by the same model *and* backend as the chunks."""
        import faiss
        import pyarrow.parquet as pq

        self.rag, self.path, self._embedder = rag, path, embedder
        self.backend, self.store = backend, store
        self.index = faiss.read_index(str(path / INDEX_FILE))
        if isinstance(self.index, faiss.IndexHNSW):
            self.index.hnsw.efSearch = rag.hnsw_ef_search  # a query-time knob
        # IVF-PQ scores are lossy: its candidates are re-scored on the (memory-mapped) vectors
        self._exact = (
            np.load(path / EMBEDDINGS_FILE, mmap_mode="r")
            if isinstance(self.index, faiss.IndexIVF)
            else None
        )
        self.chunks: dict[str, list] = pq.read_table(path / CHUNKS_FILE).to_pydict()
        self.bm25 = _bm25s().BM25.load(str(path / BM25_DIR), show_progress=False)
        self._warned_k = False

    @classmethod
    def open(cls, cfg: RunConfig, ref: ArtifactRef) -> Retriever:
        """Refuses an index built with another embedder: its vectors live in another space."""
        store = ArtifactStore(cfg.store)
        manifest = store.read_manifest(ref.stage, ref.key)
        if manifest is None:
            raise StoreError(f"{ref.stage}/{ref.key}: no readable manifest in {store.url}")
        _, fingerprint = resolve_embedder(cfg.rag.embedder)
        if fingerprint != manifest.get("embedder_hash"):
            raise ModelError(
                f"rag: index {ref.short} was built with embedder {manifest.get('embedder')!r} "
                f"({str(manifest.get('embedder_hash'))[:12]}) but rag.embedder is "
                f"{cfg.rag.embedder!r} ({fingerprint[:12]}); rebuild the index or set "
                "rag.embedder back"
            )
        backend = manifest.get("embedder_backend", "torch")  # built before backends: torch
        return cls(cfg.rag, store.local_path(ref), backend=backend, store=store)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:  # loaded on first dense query: bm25 needs no model
            emb = Embedder.load(self.rag.embedder, self.backend, self.store)
            if emb.dim != self.index.d:
                raise ModelError(
                    f"rag: embedder {emb.name!r} has dimension {emb.dim}, the index {self.index.d}"
                )
            self._embedder = emb
        return self._embedder

    def rank(
        self, queries: list[str], depth: int, modes: tuple[str, ...] = MODES
    ) -> dict[str, list[list[tuple[int, float]]]]:
        """Per mode, per query: up to `depth` (chunk id, score) pairs, best first."""
        n, out = len(self), {}
        wide = min(n, max(depth, RRF_DEPTH) if "hybrid" in modes else depth)
        if {"dense", "hybrid"} & set(modes):
            vecs = self.embedder.encode(queries, self.rag.batch_size)
            if self._exact is not None:
                from fasttrack.lib.ann_index import search

                scores, ids = search(self.index, self._exact, vecs, wide)
            else:
                scores, ids = self.index.search(vecs, wide)
            out["dense"] = [
                [(int(i), float(s)) for i, s in zip(row_i, row_s, strict=True) if i >= 0]
                for row_i, row_s in zip(ids, scores, strict=True)
            ]
        if {"bm25", "hybrid"} & set(modes):
            out["bm25"] = []
            for tokens in bm25_tokens(queries):
                scores = self.bm25.get_scores(tokens) if tokens else np.zeros(n, np.float32)
                top = np.argsort(-scores, kind="stable")[:wide]
                out["bm25"].append([(int(i), float(scores[i])) for i in top])
        if "hybrid" in modes:
            out["hybrid"] = [
                rrf([[i for i, _ in d], [i for i, s in b if s > 0]], self.rag.rrf_k)[:depth]
                for d, b in zip(out["dense"], out["bm25"], strict=True)
            ]
        return {m: [r[:depth] for r in out[m]] for m in modes}

    def search(self, query: str, k: int | None = None, mode: str | None = None) -> list[Hit]:
        k, mode = self.rag.top_k if k is None else k, mode or self.rag.mode
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if k > len(self):
            if not self._warned_k:
                get_logger().info(
                    "rag: k=%d is larger than the index (%d chunks); returning all", k, len(self)
                )
                self._warned_k = True
            k = len(self)
        c = self.chunks
        return [
            Hit(i, c["doc_id"][i], c["title"][i], c["section"][i], c["text"][i], score, rank)
            for rank, (i, score) in enumerate(self.rank([query], k, (mode,))[mode][0], 1)
        ]
