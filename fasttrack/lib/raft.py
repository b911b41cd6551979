"""RAFT-style training contexts (Zhang et al. 2024) for retrieval-augmented SFT.

Each SFT row's question is rewritten into the prompt `ask`, `serve` and the `dpo+rag` evaluation
build at inference (`ask.fitted_prompt`: numbered `[n] title: chunk` lines, the best-ranked
chunks that fit), over `k` chunks: for a share `p_oracle` of rows, the chunk(s) of the row's
`source` document (the oracle) plus `distractors` chunks of other documents; for the rest,
distractors only, so the model also learns to answer when retrieval missed.

Why chunks and BM25 are built here rather than read from the RAG artifact: SFT's key and the
flow's order stay independent of the embedder and the index (RAG keeps running beside or after
training), and the chunks are cut exactly as the RAG stage cuts them (same documents loader,
same `rag.chunk` config, same embedder tokenizer), so the oracle a prompt carries is the chunk
retrieval returns at inference. Distractors are the best BM25 matches of the question (hard
negatives, as hybrid retrieval returns them) and chunks are ordered by that score, as ranked
hits are.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from fasttrack.core.config_eval import ChunkConfig, RagContextConfig
from fasttrack.lib.ask import fitted_prompt
from fasttrack.lib.retrieval import Chunk, Document, bm25_tokens, build_bm25, chunk_document


@dataclass
class ContextIndex:
    """Chunks of the corpus and their BM25 index: where training contexts come from."""

    chunks: list[Chunk]
    bm25: Any

    @classmethod
    def build(cls, docs: list[Document], tokenizer: Any, chunk: ChunkConfig) -> ContextIndex:
        """`tokenizer`: the embedder's, as the RAG stage chunks with it."""
        chunks = [
            c
            for d in docs
            for c in chunk_document(
                d, tokenizer, chunk.size_tokens, chunk.overlap_tokens, chunk.markdown_aware
            )
        ]
        return cls(chunks, build_bm25([c.passage for c in chunks]))

    def scores(self, question: str) -> np.ndarray:
        tokens = bm25_tokens([question])[0]
        if not tokens:
            return np.zeros(len(self.chunks), np.float32)
        return np.asarray(self.bm25.get_scores(tokens), dtype=np.float32)


def is_oracle(chunk: Chunk, source: str | None) -> bool:
    """A chunk of the row's source document (matched by title or id, as retrieval eval does)."""
    return bool(source) and source in (chunk.title, chunk.doc_id)


def raft_context(
    index: ContextIndex, question: str, source: str | None, rc: RagContextConfig, seed: int
) -> list[Chunk]:
    """The `k` chunks of one training prompt, best BM25 score first. Deterministic per
    (seed, question): a row's context does not depend on the other rows or their order."""
    rng = random.Random(f"{seed}\0{question}\0{source or ''}")
    scores = index.scores(question)
    order = np.argsort(-scores, kind="stable")
    oracle = [i for i, c in enumerate(index.chunks) if is_oracle(c, source)]
    take_oracle = bool(oracle) and rng.random() < rc.p_oracle
    picked = oracle[: rc.k - rc.distractors] if take_oracle else []
    others = (int(i) for i in order if not is_oracle(index.chunks[int(i)], source))
    for i in others:
        if len(picked) >= rc.k:
            break
        picked.append(i)
    picked.sort(key=lambda i: (-float(scores[i]), i))
    return [index.chunks[i] for i in picked]


def raft_rows(
    rows: list[dict[str, Any]],
    index: ContextIndex,
    rc: RagContextConfig,
    seed: int,
    tok: Any,
    max_length: int,
) -> list[dict[str, Any]]:
    """SFT rows whose last user turn (the one answered by the last assistant turn) becomes the
    inference prompt over its RAFT context, fitted so prompt and answer fit `max_length`."""
    out = []
    for row in rows:
        messages = [dict(m) for m in row["messages"]]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        user = max((i for i in range(last) if messages[i]["role"] == "user"), default=None)
        if user is None:
            out.append(row)
            continue
        question = messages[user]["content"]
        answer = len(tok(messages[last]["content"], add_special_tokens=False)["input_ids"])
        room = max(max_length - answer - 8, 1)  # 8: the template's turn markers and EOS
        hits = raft_context(index, question, row.get("source"), rc, seed)
        messages[user]["content"] = fitted_prompt(question, hits, tok, room)[0]
        out.append(row | {"messages": messages})
    return out
