"""Per-row scores of an evaluation, their intervals, and the stage-to-stage verdicts.

The evaluate stage keeps one table of per-row sufficient statistics per kind of metric in its
artifact (`scores.json`, shape below), so any two evaluations of the same rows can be compared
later, paired row by row, without re-running a model:

    {"documents":  {"columns": ["nll", "tokens", "bytes"], "rows": [[...], ...]},   # perplexity
     "sft":        {"columns": ["nll", "tokens"], ...},                               # sft_loss
     "preference": {"columns": ["pref_accuracy", "pref_margin"], ...},  # won (0/1), margin
                                                  # (nats per answer token, chosen - rejected)
     "generation": {"columns": ["rouge1", "rouge2", "rougeL", "rougeLsum"], ...},
     "bleu":       {"columns": ["sys_len", "ref_len", "correct_1".., "total_1"..], ...},
     "retrieval":  {"columns": ["recall@1", ...], ...}}                               # hit (0/1)

A metric is a function of the column sums of one table (see fasttrack/lib/stats.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fasttrack.lib.stats import Bootstrap, FromSums, Paired, bootstrap_interval, mean, paired_test

SCORES_FILE = "scores.json"
RANKS_FILE = "ranks.json"  # in a rag artifact: mode -> rank of the expected doc per question
Scores = dict[str, dict[str, Any]]
BLEU_COLUMNS = ["sys_len", "ref_len"] + [
    f"{k}_{n}" for k in ("correct", "total") for n in (1, 2, 3, 4)
]
LOWER_IS_BETTER = {"perplexity", "bits_per_byte", "sft_loss"}
# compared between consecutive stages in the report (recall@k only exists with RAG).
# pref_margin too: on a few dozen pairs a won/lost flag has little power once a model wins most
# pairs (35 pairs, 5 lost: even winning all 5 back gives p ~ 0.06), a per-pair margin more.
VERDICT_METRICS = ("perplexity", "sft_loss", "rougeL", "bleu", "pref_accuracy", "pref_margin")
CHAIN = ("base", "pretrain", "sft", "dpo")  # report pairs consecutive models of this order


def _perplexity(s: np.ndarray, n: int) -> np.ndarray:
    return np.exp(s[..., 0] / s[..., 1])


def _bits_per_byte(s: np.ndarray, n: int) -> np.ndarray:
    return s[..., 0] / math.log(2) / s[..., 2]


def _ratio(s: np.ndarray, n: int) -> np.ndarray:
    return s[..., 0] / s[..., 1]


def _bleu(s: np.ndarray, n: int) -> np.ndarray:
    """Corpus BLEU (0-1) from summed sacrebleu sentence statistics, sacrebleu's defaults."""
    from sacrebleu.metrics.bleu import BLEU

    flat = np.rint(np.atleast_2d(s)).astype(np.int64)  # counts (sums of integer counts)
    out = [
        BLEU.compute_bleu(
            correct=row[2:6].tolist(), total=row[6:10].tolist(),
            sys_len=int(row[0]), ref_len=int(row[1]), smooth_method="exp",
        ).score / 100.0
        for row in flat
    ]  # fmt: skip
    return np.asarray(out).reshape(np.shape(s)[:-1])


# metric -> (table, its value from the table's column sums); other metrics: a table's column mean
SPECIAL: dict[str, tuple[str, FromSums]] = {
    "perplexity": ("documents", _perplexity),
    "bits_per_byte": ("documents", _bits_per_byte),
    "sft_loss": ("sft", _ratio),
    "bleu": ("bleu", _bleu),
}


@dataclass(frozen=True)
class Verdict:
    base: str  # the earlier model
    model: str  # the later one
    metric: str
    test: Paired

    def verdict(self, alpha: float) -> str:
        if self.test.p_value >= alpha or self.test.delta == 0:
            return "no significant change"
        better = (self.test.delta < 0) if self.metric in LOWER_IS_BETTER else self.test.delta > 0
        return "improved" if better else "worse"

    def row(self, alpha: float) -> dict[str, Any]:
        return {
            "from": self.base, "to": self.model, "metric": self.metric,
            "from_value": self.test.a, "to_value": self.test.b, "delta": self.test.delta,
            "p_value": self.test.p_value, "rows": self.test.rows, "verdict": self.verdict(alpha),
        }  # fmt: skip


def table(columns: list[str], rows: list[list[float]]) -> dict[str, Any]:
    return {"columns": list(columns), "rows": [list(r) for r in rows]}


def bleu_rows(predictions: list[str], references: list[str]) -> list[list[float]]:
    """sacrebleu's per-sentence statistics (lengths, matched and total 1-4-grams) per row."""
    from sacrebleu.metrics.bleu import BLEU

    stats = BLEU()._extract_corpus_statistics(list(predictions), [list(references)])
    return [[float(v) for v in row] for row in stats]


def metric_rows(scores: Scores, metric: str) -> tuple[np.ndarray, FromSums] | None:
    """(per-row statistics, metric from their sums) of `metric`, or None if not in `scores`."""
    if metric in SPECIAL:
        name, fn = SPECIAL[metric]
        t = scores.get(name)
        return (np.asarray(t["rows"], dtype=np.float64), fn) if t and t["rows"] else None
    for t in scores.values():
        if metric in t["columns"] and t["rows"]:
            col = t["columns"].index(metric)
            return np.asarray(t["rows"], dtype=np.float64)[:, [col]], mean
    return None


def metrics_of(scores: Scores) -> list[str]:
    names = [m for m, (t, _) in SPECIAL.items() if scores.get(t, {}).get("rows")]
    for name, t in scores.items():
        if name not in {t for t, _ in SPECIAL.values()} and t["rows"]:
            names += t["columns"]
    return names


def intervals(scores: Scores, cfg: Bootstrap) -> dict[str, list[float]]:
    """`metric -> [low, high]`, the bootstrap interval of every metric the scores hold."""
    out = {}
    for metric in metrics_of(scores):
        rows, fn = metric_rows(scores, metric)  # type: ignore[misc]
        low, high = bootstrap_interval(rows, fn, cfg)
        out[metric] = [round(low, 6), round(high, 6)]
    return out


def compare(base: Scores, later: Scores, metric: str, cfg: Bootstrap) -> Paired | None:
    """Paired test of `metric` between two evaluations of the same rows (None: not comparable,
    e.g. missing, or a different number of rows)."""
    a, b = metric_rows(base, metric), metric_rows(later, metric)
    if a is None or b is None or a[0].shape != b[0].shape:
        return None
    return paired_test(a[0], b[0], a[1], cfg)


def consecutive(models: list[str]) -> list[tuple[str, str]]:
    """(earlier, later) pairs: the training chain in order, then newest -> newest+rag."""
    chain = [m for m in CHAIN if m in models]
    pairs = list(zip(chain, chain[1:], strict=False))
    pairs += [(m.removesuffix("+rag"), m) for m in models if m.endswith("+rag")
              and m.removesuffix("+rag") in models]  # fmt: skip
    return pairs


def stage_verdicts(scores: dict[str, Scores], cfg: Bootstrap) -> list[Verdict]:
    """Paired tests of VERDICT_METRICS (+ recall) between consecutive stages."""
    out = []
    for base, later in consecutive(list(scores)):
        for metric in VERDICT_METRICS:
            if (test := compare(scores[base], scores[later], metric, cfg)) is not None:
                out.append(Verdict(base, later, metric, test))
    return out


def retrieval_table(ranks: list[int | None], ks: list[int]) -> dict[str, Any]:
    """Hit flags (recall@k per question) from the ranks of the expected documents."""
    hits = [[float(bool(r and r <= k)) for k in ks] for r in ranks]
    return table([f"recall@{k}" for k in ks], hits)


def bootstrap_of(cfg: Any) -> Bootstrap:
    """The run config's `evaluate.bootstrap` as the stats helpers take it."""
    b = cfg.evaluate.bootstrap
    return Bootstrap(resamples=b.resamples, seed=b.seed, level=b.level)


def rank_scores(ranks: list[int | None], ks: list[int]) -> dict[str, Any]:
    """Per question: a hit flag per recall@k and the reciprocal rank (0: not retrieved), the
    rows a retrieval mode's recall@k and MRR intervals are bootstrapped over."""
    rows = [[float(bool(r and r <= k)) for k in ks] + [1.0 / r if r else 0.0] for r in ranks]
    return table([f"recall@{k}" for k in ks] + ["mrr"], rows)


def load_scores(store: Any, evals: dict[str, Any]) -> dict[str, Scores]:
    """model -> per-row scores of its evaluation artifact (models evaluated before scores were
    kept have none and are left out)."""
    import json

    out = {}
    for model, ref in evals.items():
        path = store.local_path(ref) / SCORES_FILE
        if path.exists():
            out[model] = json.loads(path.read_text())
    return out


def pvalue_fn(scores: dict[str, Scores], cfg: Bootstrap):
    """(left model, right model, metric) -> p-value of the paired test, None if not testable."""

    def p_value(left: str, right: str, metric: str) -> float | None:
        if left not in scores or right not in scores:
            return None
        test = compare(scores[right], scores[left], metric, cfg)
        return None if test is None else test.p_value

    return p_value
