import random

import pytest

from fasttrack.lib.cleaning import (
    REASONS,
    CleanStats,
    exact_dedup,
    filter_length,
    near_dedup,
    normalize_text,
    split_records,
)

VOCAB = [f"word{i}" for i in range(3000)]


def text_of(rec: dict) -> str:
    return rec["text"]


def recs(*texts: str) -> list[dict]:
    return [{"id": i, "text": t} for i, t in enumerate(texts)]


def ids(records: list[dict]) -> list[int]:
    return [r["id"] for r in records]


def paragraph(seed: int, n: int = 60) -> str:
    return " ".join(random.Random(seed).sample(VOCAB, n))


def edit_word(text: str, pos: int) -> str:
    words = text.split()
    words[pos] = "EDITED"
    return " ".join(words)


# --- normalize_text ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("\ufb01le", "file"),  # NFKC ligature
        ("a\u00a0b", "a b"),  # non-breaking space
        ("a\r\nb\rc", "a\nb\nc"),
        ("a\x00b\x07c\x1b[0m\x7f\x9f", "abc[0m"),  # control chars removed
        ("a \t  b\t", "a b"),
        ("line one   \nline two", "line one\nline two"),  # trailing spaces per line
        ("p1\n\n\n\n  \n\np2", "p1\n\np2"),  # 3+ newlines -> paragraph break
        ("p1\n\np2", "p1\n\np2"),  # paragraph break kept
        ("  \n lead and trail \n\n", "lead and trail"),
        ("a\u2028b\x0cc", "a\nb\nc"),  # other line breaks become \n, never glue words
        ("\uff21\uff22 \u3000x", "AB x"),  # fullwidth letters and ideographic space
        ("e\u0301", "\u00e9"),  # composed
        ("e\x00\u0301", "\u00e9"),  # control removed before composing (idempotence)
        ("", ""),
    ],
)
def test_normalize_cases(raw: str, expected: str) -> None:
    assert normalize_text(raw) == expected


def test_normalize_options() -> None:
    assert normalize_text("\ufb01  x", unicode_form="NFC") == "\ufb01 x"
    assert normalize_text("\ufb01  x\r\n", unicode_form="none", collapse_whitespace=False) == (
        "\ufb01  x\n"
    )
    assert normalize_text("a\x00\tb", collapse_whitespace=False) == "a\tb"
    with pytest.raises(ValueError):
        normalize_text("x", unicode_form="NFD")  # type: ignore[arg-type]


TRICKY = (
    "a Z 1 \t\n\r\x00\x07\x0b\x0c\x1c\x1f\x7f\x85\x9f\u00a0\u2028\u2029\u3000\u200b\ufeff"
    "\ufb01\ufb03\u00bd\u2460\uff21\u0301\u0308\u0327\u1100\u1161\u11a8\uac00\u212b\u00c5"
    "\u0344\u0f73\u1e9b\u0323\U0001d400\u00df\u0130"
)


def test_normalize_idempotent_on_random_tricky_strings() -> None:
    rng = random.Random(0)
    samples = ["".join(rng.choices(TRICKY, k=rng.randint(0, 40))) for _ in range(3000)]
    for text in samples:
        for form in ("NFC", "NFKC", "none"):
            for collapse in (True, False):
                once = normalize_text(text, unicode_form=form, collapse_whitespace=collapse)
                twice = normalize_text(once, unicode_form=form, collapse_whitespace=collapse)
                assert once == twice, (text, form, collapse)


# --- filter_length / exact_dedup / stats ----------------------------------------------------


def test_filter_length_counts_reasons() -> None:
    stats = CleanStats(loaded=6)
    data = recs("", "   \n", "hi", "just right", "x" * 50, "  padded  ")
    kept = filter_length(data, text_of, min_chars=5, max_chars=20, stats=stats)
    assert ids(kept) == [3, 5]
    assert stats.dropped == {"empty": 2, "too_short": 1, "too_long": 1}
    assert stats.kept == 2
    unbounded = filter_length(data, text_of, min_chars=1, max_chars=None, stats=CleanStats())
    assert ids(unbounded) == [2, 3, 4, 5]
    with pytest.raises(ValueError):
        filter_length(data, text_of, min_chars=10, max_chars=5, stats=CleanStats())


def test_exact_dedup_ignores_case_and_whitespace_and_keeps_first() -> None:
    stats = CleanStats()
    data = recs("Hello  World", "hello world", "HELLO\nworld\t", "hello worlds", "Hello World")
    assert ids(exact_dedup(data, text_of, stats)) == [0, 3]
    assert stats.dropped == {"exact_duplicate": 3}
    assert stats.kept == 2


def test_stats_as_dict_and_describe_empty() -> None:
    stats = CleanStats(loaded=12)
    stats.drop("too_short", 10)
    stats.drop("exact_duplicate")
    stats.drop("exact_duplicate")
    row = stats.as_dict()
    assert row == {"loaded": 12, "kept": 0} | {f"dropped_{r}": 0 for r in REASONS} | {
        "dropped_too_short": 10,
        "dropped_exact_duplicate": 2,
    }
    assert stats.describe_empty() == "all 12 rows were removed: too_short 10, exact_duplicate 2"
    assert CleanStats().describe_empty() == "the input contained no rows"


def test_pipeline_to_empty_explains_itself() -> None:
    data = recs("", "ab", "a long enough text", "A  long enough TEXT", "a long enough text!!")
    stats = CleanStats(loaded=len(data))
    kept = filter_length(data, text_of, min_chars=5, max_chars=19, stats=stats)
    kept = exact_dedup(kept, text_of, stats)
    kept = near_dedup(kept, text_of, stats)
    assert ids(kept) == [2]
    kept = filter_length(kept, text_of, min_chars=50, max_chars=None, stats=stats)
    stats.drop("near_duplicate", 0)  # zero counts are not mentioned
    assert (kept, stats.kept) == ([], 0)
    assert stats.describe_empty() == (
        "all 5 rows were removed: empty 1, too_short 2, too_long 1, exact_duplicate 1"
    )


# --- near_dedup -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pos", "shingle_size"),
    # A mid-text edit touches shingle_size shingles: true Jaccard 0.90 for 3-grams but only
    # 0.84 (< 0.85) for the default 5-grams, so the default case edits near the end.
    [(58, 5), (30, 3), (0, 5)],
)
def test_near_dedup_drops_one_word_edit_keeps_unrelated(pos: int, shingle_size: int) -> None:
    base = paragraph(1)
    data = recs(base, paragraph(2), edit_word(base, pos), paragraph(3))
    stats = CleanStats()
    kept = near_dedup(data, text_of, stats, shingle_size=shingle_size)
    assert ids(kept) == [0, 1, 3]
    assert stats.dropped == {"near_duplicate": 1}
    assert stats.kept == 3


def test_near_dedup_threshold_one_keeps_edited_copy_but_drops_identical() -> None:
    base = paragraph(1)
    data = recs(base, edit_word(base, 58), base.upper())
    assert ids(near_dedup(data, text_of, CleanStats(), threshold=1.0)) == [0, 1]


def test_near_dedup_short_texts_use_whole_text() -> None:
    data = recs("red apple", "Red  apple", "green apple", "")
    assert ids(near_dedup(data, text_of, CleanStats())) == [0, 2, 3]


def test_near_dedup_deterministic_and_validates() -> None:
    data = recs(*(paragraph(i % 7, 20) + f" tail{i % 3}" for i in range(40)))
    first = ids(near_dedup(data, text_of, CleanStats(), threshold=0.8))
    assert first == ids(near_dedup(data, text_of, CleanStats(), threshold=0.8))
    assert len(first) < 40
    with pytest.raises(ValueError):
        near_dedup(data, text_of, CleanStats(), threshold=0.0)


def test_near_dedup_speed_sanity_5000_texts() -> None:
    rng = random.Random(0)
    texts = [" ".join(rng.choices(VOCAB, k=rng.randint(5, 40))) for _ in range(4500)]
    texts += [t + " extra" for t in texts[:500]]  # near-copies of long-enough texts
    stats = CleanStats()
    kept = near_dedup(recs(*texts), text_of, stats)
    assert len(kept) + stats.dropped.get("near_duplicate", 0) == 5000
    assert stats.dropped["near_duplicate"] > 100


# --- split_records ----------------------------------------------------------------------------


def test_split_sizes_and_partition() -> None:
    data = recs(*(f"row {i}" for i in range(100)))
    out = split_records(data, text_of, validation=0.1, test=0.05, seed=7)
    assert [len(out[k]) for k in ("train", "validation", "test")] == [85, 10, 5]
    all_ids = sorted(ids(out["train"]) + ids(out["validation"]) + ids(out["test"]))
    assert all_ids == list(range(100))
    for rows in out.values():  # original order kept inside each split
        assert ids(rows) == sorted(ids(rows))


def test_split_deterministic_seeded_and_order_independent() -> None:
    data = recs(*(f"row {i}" for i in range(200)))
    a = split_records(data, text_of, validation=0.1, test=0.1, seed=1)
    assert a == split_records(data, text_of, validation=0.1, test=0.1, seed=1)
    b = split_records(data, text_of, validation=0.1, test=0.1, seed=2)
    assert ids(a["test"]) != ids(b["test"])
    shuffled = data[::-1]
    c = split_records(shuffled, text_of, validation=0.1, test=0.1, seed=1)
    assert {k: sorted(ids(v)) for k, v in c.items()} == {k: sorted(ids(v)) for k, v in a.items()}


@pytest.mark.parametrize(
    ("n", "val", "test", "sizes"),
    [
        (3, 0.01, 0.01, (1, 1, 1)),  # at least one row each when n >= 3
        (3, 0.98, 0.01, (1, 1, 1)),  # clamped so train keeps a row
        (2, 0.4, 0.4, (1, 0, 1)),
        (1, 0.0, 0.6, (1, 0, 0)),
        (0, 0.1, 0.1, (0, 0, 0)),
        (10, 0.0, 0.0, (10, 0, 0)),
    ],
)
def test_split_edge_sizes(n: int, val: float, test: float, sizes: tuple[int, int, int]) -> None:
    out = split_records(recs(*map(str, range(n))), text_of, validation=val, test=test, seed=0)
    assert (len(out["train"]), len(out["validation"]), len(out["test"])) == sizes


@pytest.mark.parametrize(("val", "test"), [(-0.1, 0.1), (0.1, -0.1), (0.5, 0.5), (float("nan"), 0)])
def test_split_validates_fractions(val: float, test: float) -> None:
    with pytest.raises(ValueError):
        split_records(recs("a"), text_of, validation=val, test=test, seed=0)


def test_plain_ascii_fast_path_equals_the_general_normalisation() -> None:
    """normalize_text skips the regexes for printable ASCII + newlines; a trailing NUL (removed
    first by the general path) forces the general path on the same text."""
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice("ab .\n  \n\n") for _ in range(rng.randint(0, 30)))
        for collapse in (True, False):
            fast = normalize_text(text, collapse_whitespace=collapse)
            assert fast == normalize_text(text + "\x00", collapse_whitespace=collapse), text
