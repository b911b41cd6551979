"""Evaluation stage: metrics of one model on held-out data, cached per (model, data, eval config).

One artifact per model, so adding a stage to a run evaluates only the new model. Perplexity uses
the token-weighted strided protocol of fasttrack/lib/perplexity.py over the held-out corpus
documents, each followed by EOS (as in training); the manifest records the exact protocol, and
bits per byte makes models with different tokenizers comparable.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from fasttrack.core import faultpoint
from fasttrack.core.config import RunConfig
from fasttrack.core.errors import ModelError
from fasttrack.core.stage import BuildResult, Stage, StageSpec
from fasttrack.core.store import ArtifactRef, ArtifactStore
from fasttrack.lib.datasets import has_kind, read_split
from fasttrack.lib.device_info import hardware
from fasttrack.lib.evalstats import (
    BLEU_COLUMNS,
    RANKS_FILE,
    SCORES_FILE,
    Scores,
    bleu_rows,
    bootstrap_of,
    intervals,
    retrieval_table,
    table,
)
from fasttrack.lib.generate import generate
from fasttrack.lib.models import load_model, max_positions, pick_device
from fasttrack.lib.perplexity import per_document, strided_perplexity, token_documents
from fasttrack.lib.scoring import preference_margins, preference_summary, score_answers
from fasttrack.lib.textmetrics import ROUGE_TYPES, bleu, rouge_rows

# 2: row counts of each metric (small samples are flagged)
# 3: per-row scores (scores.json) and bootstrap intervals (metrics["ci"])
# 4: preference accuracy and margin length-normalised (mean log-prob per answer token)
STAGE = Stage("evaluate", "4")


def eval_spec(
    cfg: RunConfig, model: ArtifactRef, data: ArtifactRef, rag: ArtifactRef | None = None
) -> StageSpec:
    config = cfg.evaluate.model_dump(mode="json", exclude={"gates"})  # gates judge, not measure
    if cfg.evaluate.generation_rows:
        config["generation"] = cfg.generation.model_dump(mode="json") | {"seed": cfg.seed}
    upstream = {"model": model, "data": data}
    inputs = {}
    if rag is not None:  # the model answering with retrieved context
        config["rag"] = {"mode": cfg.rag.mode, "top_k": cfg.rag.top_k, "answer": cfg.rag.answer}
        config.pop("lm_eval", None)  # the same model as the row without RAG
        upstream["rag"] = rag
    elif cfg.evaluate.lm_eval is not None:
        from fasttrack.lib.lm_eval_run import tasks_hash

        inputs["lm_eval_tasks"] = tasks_hash(cfg.evaluate.lm_eval.include_path)
        config["lm_eval"]["seed"] = cfg.seed
    return STAGE.spec(config, upstream=upstream, inputs=inputs)


def answer_metrics(
    cfg: RunConfig, store: ArtifactStore, data: ArtifactRef, model, tok, scores: Scores
) -> dict:
    """Held-out SFT completion loss and preference accuracy (when the data has those kinds and
    the tokenizer has a chat template); their per-row statistics go into `scores`."""
    a = cfg.evaluate.answers
    out: dict[str, float] = {}
    if not tok.chat_template:
        return out
    if has_kind(store, data, "sft"):
        rows = read_split(store, data, "sft", a.split)[: a.max_rows]
        pairs = [(_last(r, "user"), _last(r, "assistant")) for r in rows]
        pairs = [(p, c) for p, c in pairs if p and c]
        if pairs:
            prompts, answers = zip(*pairs, strict=True)
            s = score_answers(model, tok, list(prompts), list(answers), a.max_length)
            out["sft_loss"] = round(-sum(s.logp) / max(sum(s.tokens), 1), 5)
            out["sft_loss_rows"] = len(pairs)
            scored = zip(s.logp, s.tokens, strict=True)
            scores["sft"] = table(["nll", "tokens"], [[-lp, n] for lp, n in scored])
    if has_kind(store, data, "preference"):
        rows = read_split(store, data, "preference", a.split)[: a.max_rows]
        if rows:
            margins = preference_margins(model, tok, rows, a.max_length)
            out |= preference_summary(margins)
            out["pref_rows"] = len(rows)
            won = [[float(m > 0), m] for m in margins]
            scores["preference"] = table(["pref_accuracy", "pref_margin"], won)
    return out


Answerer = Callable[[list[str], int], list[str]]  # (questions, seed) -> answers


def generation_metrics(
    cfg: RunConfig,
    store: ArtifactStore,
    data: ArtifactRef,
    model,
    tok,
    out: Path,
    scores: Scores,
    answer: Answerer | None = None,
    sampled: bool = True,
) -> dict:
    """Answer held-out instructions (by default: generate with the configured decoding; the RAG
    row passes its own `answer`); ROUGE/BLEU vs the references. The samples (prompt,
    reference, prediction) are kept for the report, per-row scores in `scores`. `sampled`:
    whether `evaluate.seeds` can change the answers (a quoted answer cannot)."""
    n = cfg.evaluate.generation_rows
    if not n or not tok.chat_template or not has_kind(store, data, "sft"):
        return {}
    rows = read_split(store, data, "sft", cfg.evaluate.answers.split)[:n]
    pairs = [(_last(r, "user"), _last(r, "assistant")) for r in rows]
    pairs = [(p, c) for p, c in pairs if p and c]
    if not pairs:
        return {}
    if answer is None:

        def answer(questions: list[str], seed: int) -> list[str]:
            return generate(model, tok, questions, cfg.generation, seed=seed)

    prompts, refs = (list(x) for x in zip(*pairs, strict=True))
    preds = answer(prompts, cfg.seed)
    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        for p, r, g in zip(prompts, refs, preds, strict=True):
            f.write(json.dumps({"prompt": p, "reference": r, "prediction": g}) + "\n")
    per_row = rouge_rows(preds, refs)
    scores["generation"] = table(list(ROUGE_TYPES), per_row)
    scores["bleu"] = table(BLEU_COLUMNS, bleu_rows(preds, refs))
    result = {k: round(v, 6) for k, v in _text_scores(preds, refs).items()}
    result["generation_rows"] = len(pairs)
    if (seeds := cfg.evaluate.seeds) and sampled:  # re-sampled: how much is decoding luck
        runs = [_text_scores(answer(prompts, seed), refs) for seed in seeds]
        result["seeds"] = {"seeds": list(seeds)} | {
            k: [round(r[k], 6) for r in runs] for k in runs[0]
        }
    return result


def _text_scores(preds: list[str], refs: list[str]) -> dict[str, float]:
    rows = rouge_rows(preds, refs)
    means = {k: sum(r[i] for r in rows) / len(rows) for i, k in enumerate(ROUGE_TYPES)}
    return means | {"bleu": bleu(preds, refs)["bleu"]}


def finish(cfg: RunConfig, out: Path, metrics: dict, scores: Scores) -> dict:
    """Write scores.json; add the bootstrap interval of every metric as `metrics["ci"]`."""
    (out / SCORES_FILE).write_text(json.dumps(scores))
    return metrics | {"ci": intervals(scores, bootstrap_of(cfg))}


def _last(row: dict, role: str) -> str:
    return next((m["content"] for m in reversed(row["messages"]) if m["role"] == role), "")


def build_rag_eval(cfg: RunConfig, spec: StageSpec, out: Path) -> BuildResult:
    """The model answering with retrieved context: ROUGE/BLEU of those answers, plus the
    index's recall@k, so retrieval sits in the same comparison table."""
    from fasttrack.lib.ask import fitted_prompt, quoted
    from fasttrack.lib.generate import prompt_room
    from fasttrack.lib.retrieval import Retriever

    store, rag = ArtifactStore(cfg.store), spec.upstream["rag"]
    model, tok = load_model(cfg, spec.upstream["model"])
    retriever = Retriever.open(cfg, rag)
    room = prompt_room(model, cfg.generation.max_new_tokens)

    def answer(questions: list[str], seed: int) -> list[str]:  # as `ask` answers
        fitted = [
            fitted_prompt(q, retriever.search(q, k=cfg.rag.top_k, mode=cfg.rag.mode), tok, room)
            for q in questions
        ]
        if cfg.rag.answer == "quote":
            return [quoted(model, tok, p, kept, cfg.generation.max_new_tokens, room)
                    for p, kept in fitted]  # fmt: skip
        return generate(model, tok, [p for p, _ in fitted], cfg.generation, seed=seed)

    scores: Scores = {}
    metrics = generation_metrics(
        cfg, store, spec.upstream["data"], model, tok, out, scores, answer,
        sampled=cfg.rag.answer != "quote",
    )  # fmt: skip
    mode = cfg.rag.mode
    for k in cfg.rag.eval_ks:
        metrics[f"recall@{k}"] = rag.metrics.get(f"{mode}.recall@{k}")
    ranks_path = store.local_path(rag) / RANKS_FILE
    if ranks_path.exists():  # per-question ranks: recall@k intervals and paired tests
        ranks = json.loads(ranks_path.read_text()).get(mode, [])
        if ranks:
            scores["retrieval"] = retrieval_table(ranks, cfg.rag.eval_ks)
    metrics = finish(cfg, out, metrics, scores)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return BuildResult(metrics=metrics, device={"device": pick_device(), **hardware()})


def build_eval(cfg: RunConfig, spec: StageSpec, out: Path) -> BuildResult:
    if "rag" in spec.upstream:
        return build_rag_eval(cfg, spec, out)
    pcfg = cfg.evaluate.perplexity
    store = ArtifactStore(cfg.store)
    model, tok = load_model(cfg, spec.upstream["model"])
    limit = max_positions(model)
    if limit is not None and pcfg.max_length > limit:
        raise ModelError(
            f"evaluate.perplexity.max_length ({pcfg.max_length}) is larger than the model's "
            f"max_position_embeddings ({limit})"
        )
    texts = [r["text"] for r in read_split(store, spec.upstream["data"], "corpus", pcfg.split)]
    ids, lengths, doc_bytes = token_documents(texts, tok, pcfg.max_tokens)
    n_bytes = sum(doc_bytes)
    device = pick_device()
    res = strided_perplexity(
        model.to(device),
        ids,
        max_length=pcfg.max_length,
        stride=pcfg.stride,
        batch_size=pcfg.batch_size,
        text_bytes=n_bytes,
        device=device,
        per_token=True,
    )
    docs = per_document(res.token_nll or [], lengths, doc_bytes)
    scores: Scores = {"documents": table(["nll", "tokens", "bytes"], docs)}
    metrics = {
        "perplexity": round(res.perplexity, 4),
        "bits_per_byte": round(res.bits_per_byte or 0.0, 5),
        "eval_tokens": res.tokens,
        "eval_documents": len(docs),  # the rows of its interval (small_n when few)
    }
    protocol = {
        "split": pcfg.split,
        "documents": len(texts),
        "documents_scored": len(docs),
        "max_length": res.max_length,
        "stride": res.stride,
        "windows": res.windows,
        "tokens_scored": res.tokens,
        "nll_sum": res.nll_sum,
        "bytes": res.bytes,
        "weighting": "token-weighted sum of NLL over scored tokens; context tokens masked",
    }
    metrics |= answer_metrics(cfg, store, spec.upstream["data"], model, tok, scores)
    metrics |= generation_metrics(cfg, store, spec.upstream["data"], model, tok, out, scores)
    if cfg.evaluate.lm_eval is not None:
        import tempfile

        from fasttrack.lib.lm_eval_run import run_lm_eval

        with tempfile.TemporaryDirectory() as tmp:
            harness, tables = run_lm_eval(model, tok, cfg.evaluate.lm_eval, cfg.seed, Path(tmp))
        metrics |= harness
        scores |= tables
    metrics = finish(cfg, out, metrics, scores)
    faultpoint.reached("evaluate:samples-written")  # scored and sampled, no metrics.json yet
    protocol["bootstrap"] = cfg.evaluate.bootstrap.model_dump() | {
        "unit": "row; document for perplexity, bits_per_byte"
    }
    (out / "metrics.json").write_text(json.dumps({**metrics, "protocol": protocol}, indent=2))
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return BuildResult(
        metrics=metrics,
        device={"device": device, "dtype": dtype, **hardware()},
        extra={"protocol": protocol},
    )


evaluate_model, evaluate_task = STAGE.define(eval_spec, build_eval)
