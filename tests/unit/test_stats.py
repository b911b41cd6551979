"""Bootstrap intervals, paired tests, per-row metric statistics and stage verdicts."""

import math

import numpy as np
import pytest

from fasttrack.lib.evalstats import (
    BLEU_COLUMNS,
    bleu_rows,
    compare,
    consecutive,
    intervals,
    metric_rows,
    pvalue_fn,
    retrieval_table,
    stage_verdicts,
    table,
)
from fasttrack.lib.stats import Bootstrap, bootstrap_interval, paired_test


def test_bootstrap_interval_of_a_two_point_sample_is_the_hand_computed_one() -> None:
    # Resample means of [0, 1] are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: the 2.5th and
    # 97.5th percentiles are 0 and 1; the 30th and 70th both 0.5 (far from any mass boundary).
    assert bootstrap_interval([0.0, 1.0], cfg=Bootstrap(4000, seed=3)) == (0.0, 1.0)
    assert bootstrap_interval([0.0, 1.0], cfg=Bootstrap(4000, seed=3, level=0.4)) == (0.5, 0.5)
    assert bootstrap_interval([2.5] * 7) == (2.5, 2.5)


def test_bootstrap_interval_is_the_textbook_percentile_interval_for_the_seed() -> None:
    x = np.array([0.1, 0.4, 0.35, 0.8, 0.05, 0.6, 0.2, 0.9])
    rng = np.random.default_rng(11)
    means = x[rng.integers(0, len(x), size=(500, len(x)))].mean(axis=1)
    expected = np.percentile(means, [2.5, 97.5])
    assert np.allclose(bootstrap_interval(x, cfg=Bootstrap(500, seed=11)), expected, atol=1e-12)


def test_bootstrap_is_reproducible_with_its_seed_and_changes_without() -> None:
    x = np.random.default_rng(0).random(40)
    a = bootstrap_interval(x, cfg=Bootstrap(300, seed=5))
    assert a == bootstrap_interval(x, cfg=Bootstrap(300, seed=5))
    assert a != bootstrap_interval(x, cfg=Bootstrap(300, seed=6))
    assert a[0] < x.mean() < a[1]


def test_perplexity_interval_resamples_documents_as_a_ratio() -> None:
    # Two kinds of documents: 10 tokens at 1 nat/token, 100 tokens at 3 nats/token. The pooled
    # perplexity weighs tokens: exp(310/110) lies near the long documents' exp(3), far above
    # the mean of per-document ratios exp(2); every resample with both kinds stays in between.
    docs = table(["nll", "tokens", "bytes"], [[10, 10, 40], [300, 100, 400]] * 10)
    ci = intervals({"documents": docs}, Bootstrap(500, seed=1))
    low, high = ci["perplexity"]
    assert math.exp(1) < low < math.exp(310 / 110) < high < math.exp(3)
    assert "bits_per_byte" in ci


def test_paired_test_finds_a_planted_difference_and_not_a_null_one() -> None:
    rng = np.random.default_rng(2)
    base = rng.random(50)
    better = base + 0.05 + rng.normal(0, 0.02, 50)
    test = paired_test(base, better, cfg=Bootstrap(1000, seed=0))
    assert test.delta == pytest.approx(better.mean() - base.mean())
    assert test.p_value < 0.01
    noise = base + rng.normal(0, 0.02, 50)  # same model, different noise: no real change
    assert paired_test(base, noise, cfg=Bootstrap(1000, seed=0)).p_value > 0.05
    assert paired_test(base, base).p_value == 1.0


def test_paired_test_needs_the_same_rows() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        paired_test([1.0, 2.0], [1.0, 2.0, 3.0])


def test_corpus_bleu_from_summed_sentence_statistics_equals_sacrebleu() -> None:
    from fasttrack.lib.textmetrics import bleu

    preds = ["the cat sat on the mat", "json loads parses a string", "open a file to read"]
    refs = ["the cat sat on a mat", "json.loads parses a JSON string", "open a file for reading"]
    rows = bleu_rows(preds, refs)
    assert len(rows) == 3 and len(rows[0]) == len(BLEU_COLUMNS)
    stats, from_sums = metric_rows({"bleu": table(BLEU_COLUMNS, rows)}, "bleu")
    assert float(from_sums(stats.sum(0), 3)) == pytest.approx(bleu(preds, refs)["bleu"])


def _scores(pref: list[float], loss_nll: list[float]) -> dict:
    won = [[float(m > 0), m] for m in pref]
    return {
        "preference": table(["pref_accuracy", "pref_margin"], won),
        "sft": table(["nll", "tokens"], [[v, 10] for v in loss_nll]),
    }


def test_stage_verdicts_say_improved_worse_or_no_change() -> None:
    rng = np.random.default_rng(4)
    margins = rng.normal(0, 1, 60)
    nll = rng.uniform(20, 30, 60)
    scores = {
        "base": _scores(list(margins), list(nll)),
        "sft": _scores(list(margins + 3), list(nll - 5)),  # prefers chosen, lower loss
        "dpo": _scores(list(margins + 3), list(nll + 5)),  # same preference, higher loss
    }
    cfg = Bootstrap(500, seed=0)
    got = {(v.base, v.model, v.metric): v.verdict(0.05) for v in stage_verdicts(scores, cfg)}
    assert got[("base", "sft", "pref_accuracy")] == "improved"
    assert got[("base", "sft", "sft_loss")] == "improved"  # lower is better
    assert got[("sft", "dpo", "sft_loss")] == "worse"
    assert got[("sft", "dpo", "pref_accuracy")] == "no significant change"
    assert got[("base", "sft", "pref_margin")] == "improved"
    assert got[("sft", "dpo", "pref_margin")] == "no significant change"
    assert consecutive(["base", "sft", "dpo", "dpo+rag"]) == [
        ("base", "sft"), ("sft", "dpo"), ("dpo", "dpo+rag")
    ]  # fmt: skip
    p = pvalue_fn(scores, cfg)
    assert p("sft", "base", "pref_accuracy") < 0.05 and p("sft", "nope", "bleu") is None


def test_compare_refuses_different_rows_and_recall_hits_come_from_ranks() -> None:
    a = {"generation": table(["rougeL"], [[0.1], [0.2]])}
    b = {"generation": table(["rougeL"], [[0.1], [0.2], [0.3]])}
    assert compare(a, b, "rougeL", Bootstrap(100)) is None
    hits = retrieval_table([1, 3, None, 6], [1, 5])
    assert hits["rows"] == [[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
    assert intervals({"retrieval": hits}, Bootstrap(200))["recall@5"][1] <= 1.0


def test_table_rows_keep_floats_and_show_intervals_with_the_small_n_flag() -> None:
    from fasttrack.core.store import ArtifactRef
    from fasttrack.lib.tables import display_rows, metrics_table

    ci = {"perplexity": [160.0, 170.5], "rougeL": [0.2, 0.3]}
    metrics = {"perplexity": 166.7423, "eval_documents": 1, "rougeL": 0.25,
               "generation_rows": 40, "ci": ci}  # fmt: skip
    (row,) = metrics_table({"sft": ArtifactRef(stage="evaluate", key="k" * 64, uri="u",
                                               metrics=metrics)})  # fmt: skip
    assert row["perplexity"] == 166.7423 and row["ci"]["rougeL"] == [0.2, 0.3]
    assert row["small_n"] == "perplexity n=1"  # 40 answers are enough; 1 document is not
    (shown,) = display_rows([row])
    assert shown["perplexity"] == "166.7 [160, 170.5]" and shown["rougeL"] == "0.25 [0.2, 0.3]"
    assert "ci" not in shown and shown["bleu"] is None


def test_a_few_won_back_pairs_cannot_be_significant_but_their_margins_can() -> None:
    """35 pairs, the earlier model loses 5 and the later one wins them all back: the won flags
    differ on 5 rows only (p ~ 2 / 2**5 > 0.05); the margins grew on every row."""
    rng = np.random.default_rng(7)
    before = np.concatenate([rng.uniform(0.1, 0.8, 30), -rng.uniform(0.05, 0.3, 5)])
    after = np.abs(before) + 0.6 + rng.normal(0, 0.05, 35)
    scores = {"sft": _scores(list(before), [1.0] * 35), "dpo": _scores(list(after), [1.0] * 35)}
    got = {v.metric: v for v in stage_verdicts(scores, Bootstrap(1000, seed=0))}
    assert got["pref_accuracy"].test.delta == pytest.approx(5 / 35)
    assert got["pref_accuracy"].test.p_value > 0.05
    assert got["pref_accuracy"].verdict(0.05) == "no significant change"
    assert got["pref_margin"].verdict(0.05) == "improved"
