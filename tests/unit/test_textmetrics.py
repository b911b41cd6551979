import math

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from fasttrack.lib.textmetrics import ROUGE_TYPES, bleu, rouge

# A perfect match, a total miss and a partial overlap.
PREDS = ["the cat sat on the mat", "blue green red", "the quick brown fox"]
REFS = ["the cat sat on the mat", "one two three", "the quick brown dog jumps"]


def _independent_mean(preds, refs, use_stemmer=False):
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    per_pair = [scorer.score(r, p) for p, r in zip(preds, refs, strict=True)]
    return {k: sum(s[k].fmeasure for s in per_pair) / len(per_pair) for k in ROUGE_TYPES}


def test_rouge_matches_rouge_scorer_per_pair_mean():
    got = rouge(PREDS, REFS)
    assert set(got) == set(ROUGE_TYPES)
    want = _independent_mean(PREDS, REFS)
    for key in ROUGE_TYPES:
        assert got[key] == pytest.approx(want[key], abs=1e-6)


def test_rouge_hand_computed():
    # Pair 3: pred has 4 unigrams, ref 5, overlap {the, quick, brown} = 3:
    # P = 3/4, R = 3/5, F1 = 2PR/(P+R) = 0.9/1.35 = 2/3. Pairs 1 and 2 give 1 and 0.
    p, r = 3 / 4, 3 / 5
    f1 = 2 * p * r / (p + r)
    assert f1 == pytest.approx(2 / 3)
    got = rouge(PREDS, REFS)
    assert got["rouge1"] == pytest.approx((1 + 0 + f1) / 3, abs=1e-9)  # 5/9
    # Bigrams: pred 3, ref 4, overlap {the quick, quick brown} = 2: P=2/3, R=1/2, F1=4/7.
    assert got["rouge2"] == pytest.approx((1 + 0 + 4 / 7) / 3, abs=1e-9)
    # LCS "the quick brown" = 3 tokens, same counts as ROUGE-1 here.
    assert got["rougeL"] == pytest.approx(5 / 9, abs=1e-9)
    assert rouge(["x y"], ["x y"]) == dict.fromkeys(ROUGE_TYPES, 1.0)


def test_rouge_lsum_splits_on_newlines():
    # Tokens [b c a] vs [a b c]: LCS 2 of 3 -> rougeL 2/3. Sentence-level union LCS
    # ("a" vs "a", "b c" vs "b c") recovers everything -> rougeLsum 1.
    got = rouge(["b c\na"], ["a\nb c"])
    assert got["rougeL"] == pytest.approx(2 / 3)
    assert got["rougeLsum"] == pytest.approx(1.0)


def test_rouge_stemmer():
    assert rouge(["cats running"], ["cat runs"])["rouge1"] == 0.0
    assert rouge(["cats running"], ["cat runs"], use_stemmer=True)["rouge1"] == 1.0


def test_bleu_matches_sacrebleu():
    got = bleu(PREDS, REFS)
    ref = sacrebleu.corpus_bleu(PREDS, [REFS])
    assert got["sacrebleu"] == pytest.approx(ref.score, abs=1e-6)
    assert got["bleu"] == pytest.approx(ref.score / 100, abs=1e-8)
    assert got["bleu_precisions"] == pytest.approx(ref.precisions)
    assert got["brevity_penalty"] == pytest.approx(ref.bp)
    assert bleu(REFS, REFS)["sacrebleu"] == pytest.approx(100.0)


def test_bleu_hand_computed():
    # 6 vs 6 tokens, so BP = 1. Matches: 1-grams 5/6, 2-grams 3/5 (the cat, cat sat, sat on),
    # 3-grams 2/4, 4-grams 1/3. BLEU = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = (1/12) ** 0.25.
    got = bleu(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert got["bleu_precisions"] == pytest.approx([500 / 6, 60.0, 50.0, 100 / 3])
    assert got["brevity_penalty"] == pytest.approx(1.0)
    assert got["sacrebleu"] == pytest.approx(100 * (1 / 12) ** 0.25, abs=1e-6)  # 53.7285
    # A 5-token prefix of a 6-token reference: all precisions 100, BP = exp(1 - 6/5).
    short = bleu(["the cat sat on the"], ["the cat sat on the mat"])
    assert short["brevity_penalty"] == pytest.approx(math.exp(-0.2))
    assert short["sacrebleu"] == pytest.approx(100 * math.exp(-0.2), abs=1e-6)


def test_bleu_empty_prediction_scores_zero():
    got = bleu([""], ["the cat sat on the mat"])
    assert got["sacrebleu"] == 0.0
    assert got["bleu"] == 0.0


@pytest.mark.parametrize("fn", [rouge, bleu])
def test_validation(fn):
    with pytest.raises(ValueError, match="2 predictions vs 1 references"):
        fn(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty"):
        fn([], [])


def test_rouge_is_the_centre_of_evaluates_bootstrap_mid():
    # evaluate's default reports BootstrapAggregator's mid: the median of 1000 resample means,
    # random, scattered around the plain mean this module reports.
    import random

    import numpy as np
    from rouge_score import scoring

    rng = random.Random(0)
    vocab = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]
    preds = [" ".join(rng.choices(vocab, k=rng.randint(3, 9))) for _ in range(20)]
    refs = [" ".join(rng.choices(vocab, k=rng.randint(3, 9))) for _ in range(20)]
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES))
    aggregator = scoring.BootstrapAggregator()
    for p, r in zip(preds, refs, strict=True):
        aggregator.add_scores(scorer.score(r, p))
    state = np.random.get_state()
    np.random.seed(0)
    try:
        mid = {k: v.mid.fmeasure for k, v in aggregator.aggregate().items()}
    finally:
        np.random.set_state(state)
    got = rouge(preds, refs)
    for key in ROUGE_TYPES:
        assert got[key] == pytest.approx(mid[key], abs=0.01)
