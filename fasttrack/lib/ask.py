"""`fasttrack ask`: retrieve from the run's RAG index, answer with the run's newest model.

The prompt numbers the retrieved chunks so the answer can cite them, and goes through the same
chat template the model was tuned with; decoding comes from the config's `generation` section.
"""

from __future__ import annotations

from typing import Any

from fasttrack.core.config import RunConfig
from fasttrack.core.errors import FastTrackError
from fasttrack.core.store import ArtifactRef
from fasttrack.lib.answer import Answer
from fasttrack.lib.generate import chat_text, generate, prompt_room

PROMPT = "Answer the question using the context. Cite sources as [n].\n\n{context}\n\nQuestion: {q}"


def run_index(cfg: RunConfig) -> ArtifactRef:
    """The RAG artifact of this config's run (lookup only)."""
    from fasttrack.lib.chain import lookup  # Prefect: not for `ask --server` (serve_client)

    data = lookup(cfg, "data")
    ref = lookup(cfg, "rag", data) if data else None
    if ref is None:
        raise FastTrackError(
            f"no RAG index for run {cfg.name!r} in {cfg.store}: "
            "run `fasttrack run` with the rag stage"
        )
    return ref


def build_prompt(question: str, hits: list[Any]) -> str:
    context = "\n\n".join(f"[{i}] {h.title}: {h.text}" for i, h in enumerate(hits, 1))
    return PROMPT.format(context=context, q=question)


def fitted_prompt(
    question: str, hits: list[Any], tok: Any = None, room: int | None = None
) -> tuple[str, list[Any]]:
    """The prompt over the best-ranked hits whose chat-templated prompt fits `room` tokens, and
    those hits: the lowest-ranked go first (cutting the prompt on the left, as a model's context
    forces, would drop the best-ranked chunks, which come first). The best hit always stays:
    a context too small even for it is cut on the left as before."""
    kept = list(hits)
    while True:
        prompt = build_prompt(question, kept)
        if tok is None or room is None or len(kept) <= 1:
            return prompt, kept
        text = chat_text(tok, [{"role": "user", "content": prompt}])
        if len(tok(text, add_special_tokens=False)["input_ids"]) <= room:
            return prompt, kept
        kept.pop()


def rag_prompt(
    retriever: Any,
    question: str,
    k: int | None = None,
    mode: str | None = None,
    tok: Any = None,
    room: int | None = None,
) -> tuple[str, list[Any]]:
    """The cited-context prompt for `question` and the hits it cites (ask and serve share it),
    fitted to `room` prompt tokens when given."""
    return fitted_prompt(question, retriever.search(question, k=k, mode=mode), tok, room)


def quoted(
    model: Any, tok: Any, prompt: str, hits: list[Any], max_new_tokens: int, room: int | None
) -> str:
    """`rag.answer: quote`: the sentence of the hits in the prompt the model finds likeliest as
    its answer (fasttrack/lib/quote.py), cited as `[n]`; "" when the hits hold no sentence."""
    from fasttrack.lib.quote import quote_answer

    q = quote_answer(model, tok, prompt, hits, max_new_tokens, room)
    return "" if q is None else f"{q.text} [{q.hit + 1}]"


def answer(
    cfg: RunConfig,
    question: str,
    k: int | None = None,
    mode: str | None = None,
    model: str | None = None,
) -> Answer:
    """`model`: a stage of MODEL_ORDER; default the most trained one (never the untrained base)."""
    from fasttrack.lib.models import load_model
    from fasttrack.lib.retrieval import Retriever

    if not question.strip():
        raise FastTrackError("ask: the question is empty")
    from fasttrack.lib.chain import pick_model

    stage, ref, notes = pick_model(cfg, model)  # before the index: fail fast, load nothing
    retriever = Retriever.open(cfg, run_index(cfg))
    mode = mode or cfg.rag.mode
    lm, tok = load_model(cfg, ref)
    room = prompt_room(lm, cfg.generation.max_new_tokens)
    hits = retriever.search(question, k=k or cfg.rag.top_k, mode=mode)
    prompt, kept = fitted_prompt(question, hits, tok, room)
    if cfg.rag.answer == "quote":
        text = quoted(lm, tok, prompt, kept, cfg.generation.max_new_tokens, room)
    else:
        text = generate(lm, tok, [prompt], cfg.generation, seed=cfg.seed)[0]
    return Answer(text, hits, mode, stage, ref.short, notes, in_prompt=len(kept))
