"""`fasttrack ask`: retrieve from the run's RAG index, answer with the run's newest model.

The prompt numbers the retrieved chunks so the answer can cite them, and goes through the same
chat template the model was tuned with; decoding comes from the config's `generation` section.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasks.config import RunConfig
from tasks.errors import FastTrackError
from tasks.generate import generate, newest_model
from tasks.integrity import checked_lookup
from tasks.store import ArtifactRef, ArtifactStore

PROMPT = "Answer the question using the context. Cite sources as [n].\n\n{context}\n\nQuestion: {q}"


@dataclass
class Answer:
    text: str
    hits: list[Any]
    mode: str
    model_stage: str
    model_key: str


def run_index(cfg: RunConfig) -> ArtifactRef:
    """The RAG artifact of this config's run (lookup only)."""
    from tasks.data import data_spec
    from tasks.rag import rag_spec

    store = ArtifactStore(cfg.store)
    data = checked_lookup(store, "data", data_spec(cfg).key)
    ref = checked_lookup(store, "rag", rag_spec(cfg, data).key) if data else None
    if ref is None:
        raise FastTrackError(
            f"no RAG index for run {cfg.name!r} in {cfg.store}: "
            "run `fasttrack run` with the rag stage"
        )
    return ref


def build_prompt(question: str, hits: list[Any]) -> str:
    context = "\n\n".join(f"[{i}] {h.title}: {h.text}" for i, h in enumerate(hits, 1))
    return PROMPT.format(context=context, q=question)


def rag_prompt(
    retriever: Any, question: str, k: int | None = None, mode: str | None = None
) -> tuple[str, list[Any]]:
    """The cited-context prompt for `question` and the hits it cites (ask and serve share it)."""
    hits = retriever.search(question, k=k, mode=mode)
    return build_prompt(question, hits), hits


def answer(cfg: RunConfig, question: str, k: int | None = None, mode: str | None = None) -> Answer:
    from tasks.models import load_model
    from tasks.retrieval import Retriever

    if not question.strip():
        raise FastTrackError("ask: the question is empty")
    retriever = Retriever.open(cfg, run_index(cfg))
    mode = mode or cfg.rag.mode
    prompt, hits = rag_prompt(retriever, question, k=k or cfg.rag.top_k, mode=mode)
    stage, ref = newest_model(cfg)
    model, tok = load_model(cfg, ref)
    text = generate(model, tok, [prompt], cfg.generation, seed=cfg.seed)[0]
    return Answer(text=text, hits=hits, mode=mode, model_stage=stage, model_key=ref.short)
