"""How well does the model choose the sentence `rag.answer: quote` returns? On held-out
**validation** questions of a finished run (the test rows stay for the report), ROUGE-L against
the reference of three ways to pick a context sentence:

- `model_mean_logp`: what quote mode does (the model's mean log-prob per token of the sentence as
  its answer to the RAG prompt);
- `model_pmi`: the same minus its score under the prompt with the question removed (how much the
  question, not the sentence's own fluency, makes it likely: Holtzman et al. 2021's PMI);
- `first_sentence_of_top_hit`: no model at all, the retriever's best chunk's opening sentence
  (on the demo the reference *is* a docstring's first sentence, so this is an upper-bound-like
  extractive baseline, not something a model-based answer should be tuned towards).

    python benchmarks/quote_scoring.py [CONFIG] [--stage dpo] [--rows 64] [--set store=...]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import tasks  # noqa: F401  (registers the stages: the chain computes their keys)
from fasttrack.core.config_loader import load_config
from fasttrack.core.store import ArtifactStore
from fasttrack.lib.ask import build_prompt, fitted_prompt, run_index
from fasttrack.lib.chain import lookup, run_models
from fasttrack.lib.datasets import read_split
from fasttrack.lib.generate import prompt_room
from fasttrack.lib.models import load_model
from fasttrack.lib.quote import candidates, score_sentences
from fasttrack.lib.retrieval import Retriever
from fasttrack.lib.textmetrics import rouge_rows

OUT = Path(__file__).parent / "results" / "quote_scoring.json"


def _last(row: dict, role: str) -> str:
    return next(m["content"] for m in reversed(row["messages"]) if m["role"] == role)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", nargs="?")
    ap.add_argument("--stage", default="dpo")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    cfg = load_config(args.config, args.sets)
    rows = read_split(ArtifactStore(cfg.store), lookup(cfg, "data"), "sft", "validation")
    pairs = [(_last(r, "user"), _last(r, "assistant")) for r in rows[: args.rows]]
    model, tok = load_model(cfg, run_models(cfg)[args.stage])
    retriever = Retriever.open(cfg, run_index(cfg))
    room = prompt_room(model, cfg.generation.max_new_tokens)
    picks: dict[str, list[str]] = {"model_mean_logp": [], "model_pmi": [],
                                   "first_sentence_of_top_hit": []}  # fmt: skip
    for question, _ in pairs:
        hits = retriever.search(question, k=cfg.rag.top_k, mode=cfg.rag.mode)
        prompt, kept = fitted_prompt(question, hits, tok, room)
        found = candidates(kept)

        texts = [s for _, s in found]
        with_q = score_sentences(model, tok, prompt, texts, room)
        without_q = score_sentences(model, tok, build_prompt("", kept), texts, room)
        pmi = [a - b for a, b in zip(with_q, without_q, strict=True)]
        for name, sc in (("model_mean_logp", with_q), ("model_pmi", pmi)):
            picks[name].append(found[max(range(len(sc)), key=lambda j: (sc[j], -j))][1])
        picks["first_sentence_of_top_hit"].append(found[0][1] if found else "")
    refs = [r for _, r in pairs]
    result = {
        "config": args.config or "tiny-cpu (embedded default)",
        "stage": args.stage,
        "split": "validation",
        "questions": len(pairs),
        "loadavg_after": list(os.getloadavg()),
        "rougeL": {
            name: round(sum(r[2] for r in rouge_rows(p, refs)) / len(refs), 4)
            for name, p in picks.items()
        },
        "examples": [
            {"question": q, "reference": r, **{k: v[i] for k, v in picks.items()}}
            for i, (q, r) in enumerate(pairs[:5])
        ],
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["rougeL"]))


if __name__ == "__main__":
    main()
