"""ROUGE and BLEU from the reference implementations, offline.

``evaluate.load("rouge")`` fetches its metric script from the Hub, so this module calls the same
libraries the Hugging Face ``evaluate`` "rouge" and "sacrebleu" modules wrap:

* ROUGE: ``rouge_score.rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"],
  use_stemmer=...)`` scored per ``(reference, prediction)`` pair with the default tokenizer and
  ``split_summaries=False``, exactly as ``evaluate``'s rouge ``_compute`` does. ``rougeLsum``
  therefore treats ``"\\n"`` as the sentence separator (no NLTK punkt data is needed).
  Aggregation differs on purpose: ``evaluate`` (``use_aggregator=True``) reports
  ``BootstrapAggregator().aggregate()[key].mid.fmeasure``, which is the median of 1000 bootstrap
  resample means drawn with the unseeded global NumPy RNG, so it changes from call to call and
  only approximates the sample mean. We report the plain mean of the per-pair F-measures: it is
  deterministic and is what "average ROUGE-F" means; the bootstrap mid scatters around it.
* BLEU: ``sacrebleu.corpus_bleu(predictions, [references])`` with sacrebleu's defaults (13a
  tokenizer, exponential smoothing), one reference per prediction.
"""

from __future__ import annotations

from typing import Any

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def _check(predictions: list[str], references: list[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references differ in length: "
            f"{len(predictions)} predictions vs {len(references)} references"
        )
    if not predictions:
        raise ValueError("predictions and references must not be empty")


def rouge(
    predictions: list[str], references: list[str], use_stemmer: bool = False
) -> dict[str, float]:
    """Mean ROUGE F-measure over the pairs, keys ``rouge1``, ``rouge2``, ``rougeL``,
    ``rougeLsum``, each in [0, 1]."""
    rows = rouge_rows(predictions, references, use_stemmer)
    return {key: sum(r[i] for r in rows) / len(rows) for i, key in enumerate(ROUGE_TYPES)}


def rouge_rows(
    predictions: list[str], references: list[str], use_stemmer: bool = False
) -> list[list[float]]:
    """Per-pair ROUGE F-measures, columns in ROUGE_TYPES order (the rows a bootstrap resamples)."""
    from rouge_score import rouge_scorer

    _check(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    rows = []
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)  # (target, prediction)
        rows.append([scores[key].fmeasure for key in ROUGE_TYPES])
    return rows


def bleu(predictions: list[str], references: list[str]) -> dict[str, Any]:
    """Corpus BLEU: ``sacrebleu`` (0-100 scale), ``bleu`` (the same divided by 100),
    ``bleu_precisions`` (1- to 4-gram precisions, percent) and ``brevity_penalty``."""
    import sacrebleu

    _check(predictions, references)
    result = sacrebleu.corpus_bleu(list(predictions), [list(references)])
    return {
        "sacrebleu": float(result.score),
        "bleu": float(result.score) / 100.0,
        "bleu_precisions": [float(p) for p in result.precisions],
        "brevity_penalty": float(result.bp),
    }
