import random

import numpy as np
import pytest

from fasttrack.lib import minhash
from fasttrack.lib.cleaning import CleanStats, lsh_params, near_dedup
from fasttrack.lib.minhash import LshIndex, band_keys, signatures

VOCAB = [f"word{i}" for i in range(3000)]


def keep(texts: list[str], threshold: float = 0.85, shingle_size: int = 5) -> list[int]:
    """Indices kept by the streaming index, fed in batches of 3 rows."""
    bands, rows = lsh_params(threshold, 128)
    index, kept = LshIndex(128, bands, rows, threshold), []
    for start in range(0, len(texts), 3):
        chunk = texts[start : start + 3]
        sigs = signatures(chunk, num_perm=128, shingle_size=shingle_size, seed=1)
        mask = index.filter(sigs, band_keys(sigs, bands, rows))
        kept += [start + i for i in np.nonzero(mask)[0].tolist()]
    return kept


def jaccard(a: str, b: str, size: int = 5) -> float:
    def grams(t: str) -> set[str]:
        w = t.lower().split()
        return {" ".join(w[i : i + size]) for i in range(max(len(w) - size + 1, 1))}

    x, y = grams(a), grams(b)
    return len(x & y) / len(x | y)


def test_signature_agreement_estimates_jaccard() -> None:
    rng = random.Random(3)
    base = [rng.choice(VOCAB) for _ in range(200)]
    for changed in (0, 2, 10, 40, 120, 200):
        other = list(base)
        for i in rng.sample(range(200), changed):
            other[i] = rng.choice(VOCAB) + "x"
        a, b = " ".join(base), " ".join(other)
        sigs = signatures([a, b], num_perm=256, shingle_size=5, seed=0)
        estimate = (sigs[0] == sigs[1]).mean()
        assert abs(estimate - jaccard(a, b)) < 0.08, (changed, estimate, jaccard(a, b))


def paragraph(seed: int, n: int = 60) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def test_index_is_greedy_like_near_dedup() -> None:
    """Same decisions as cleaning.near_dedup on its cases: a 1-word edit near the end is a
    near copy, case/whitespace variants are copies, short texts compare whole, and only
    kept rows count (A~B, B~C, not A~C keeps A and C)."""
    base = paragraph(1)
    edited = base.split()
    edited[58] = "changed"
    a = paragraph(5, 400)
    b = " ".join(a.split()[30:] + paragraph(6, 30).split())  # 0.86 with a
    c = " ".join(b.split()[30:] + paragraph(7, 30).split())  # 0.86 with b, 0.74 with a
    texts = [base, paragraph(2), " ".join(edited), base.upper(), "red apple", "Red  apple",
             "green apple", paragraph(3)]  # fmt: skip
    assert keep(texts) == [0, 1, 4, 6, 7]
    recs = [{"i": i, "text": t} for i, t in enumerate(texts)]
    old = near_dedup(recs, lambda r: r["text"], CleanStats())
    assert keep(texts) == [r["i"] for r in old]
    assert keep([a, b, c], threshold=0.8) == [0, 2]
    chain = near_dedup([{"i": i, "text": t} for i, t in enumerate((a, b, c))],
                       lambda r: r["text"], CleanStats(), threshold=0.8)  # fmt: skip
    assert [r["i"] for r in chain] == [0, 2]


def test_index_frozen_buckets_give_the_same_decisions(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(0)
    texts = [" ".join(rng.choices(VOCAB, k=rng.randint(5, 40))) for _ in range(300)]
    texts += [t + " extra" for t in texts[:100] if len(t.split()) >= 30]
    default = keep(texts)
    monkeypatch.setattr(minhash, "_CHUNK", 4)  # freeze every few rows, many signature chunks
    assert keep(texts) == default
    assert len(default) < len(texts)
