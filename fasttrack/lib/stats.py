"""Seeded bootstrap intervals and paired randomization tests over per-row statistics.

Every evaluation metric here is a function of the column sums of a per-row table of sufficient
statistics (a row's ROUGE F; a pair's won flag; a document's NLL and token count; a sentence's
BLEU n-gram counts). Resampling rows therefore means re-weighting rows and recomputing the metric
from the weighted sums, so a ratio metric (perplexity = exp(sum NLL / sum tokens), corpus BLEU)
stays the same ratio in every resample instead of becoming a mean of per-row ratios.

* Interval: percentile bootstrap (Efron), `resamples` resamples of the rows with replacement
  drawn from ``numpy.random.default_rng(seed)``: the same seed gives the same interval.
* Paired test: approximate randomization (Noreen 1989; Riezler & Maxwell 2005), the test NLP
  papers use for "is B better than A on the same rows": under the null each row's two scores are
  exchangeable, so each resample swaps the two models' rows with probability 1/2 and recomputes
  the difference; p = (1 + #{|d*| >= |d|}) / (1 + resamples).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# metric value(s) from column sums: (..., k) sums and the row count -> (...) values
FromSums = Callable[[np.ndarray, int], np.ndarray]


@dataclass(frozen=True)
class Bootstrap:
    resamples: int = 1000
    seed: int = 0
    level: float = 0.95


@dataclass(frozen=True)
class Paired:
    """Outcome of a paired test of `b` against `a` on the same rows."""

    a: float
    b: float
    delta: float  # b - a
    p_value: float
    rows: int


def mean(sums: np.ndarray, n: int) -> np.ndarray:
    return sums[..., 0] / n


def _table(rows: np.ndarray | list) -> np.ndarray:
    x = np.asarray(rows, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"need a non-empty (rows, columns) table, got shape {x.shape}")
    return x


def _counts(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    """(resamples, n): how often each row occurs in each resample drawn with replacement."""
    idx = rng.integers(0, n, size=(resamples, n))
    counts = np.zeros((resamples, n))
    np.add.at(counts, (np.arange(resamples)[:, None], idx), 1.0)
    return counts


def bootstrap_interval(
    rows: np.ndarray | list, from_sums: FromSums = mean, cfg: Bootstrap = Bootstrap()
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the metric over the rows (a one-column list: its mean)."""
    x = _table(rows)
    n = x.shape[0]
    values = from_sums(_counts(np.random.default_rng(cfg.seed), n, cfg.resamples) @ x, n)
    tail = 100 * (1 - cfg.level) / 2
    low, high = np.percentile(values[np.isfinite(values)], [tail, 100 - tail])
    return float(low), float(high)


def paired_test(
    rows_a: np.ndarray | list,
    rows_b: np.ndarray | list,
    from_sums: FromSums = mean,
    cfg: Bootstrap = Bootstrap(),
) -> Paired:
    """Approximate-randomization test of metric(b) - metric(a); row i of a pairs with row i of b."""
    a, b = _table(rows_a), _table(rows_b)
    if a.shape != b.shape:
        raise ValueError(f"paired rows differ in shape: {a.shape} vs {b.shape}")
    n = a.shape[0]
    value_a = float(from_sums(a.sum(0), n))
    value_b = float(from_sums(b.sum(0), n))
    observed = value_b - value_a
    swap = np.random.default_rng(cfg.seed).integers(0, 2, size=(cfg.resamples, n)).astype(float)
    keep = 1.0 - swap
    sums_a, sums_b = keep @ a + swap @ b, keep @ b + swap @ a
    deltas = from_sums(sums_b, n) - from_sums(sums_a, n)
    tol = 1e-12 * max(1.0, abs(observed))
    extreme = int(np.sum(np.abs(deltas) >= abs(observed) - tol))
    p = (1 + extreme) / (1 + cfg.resamples)
    return Paired(a=value_a, b=value_b, delta=observed, p_value=p, rows=n)
