"""Text cleaning for the data-prep pipeline: normalisation, length filter, dedup, split.

Records are plain dicts; every step takes a caller-supplied ``text_of(record) -> str`` so the
same code works for any record schema. Filtering steps count what they drop in a
:class:`CleanStats` so an empty result can be explained instead of failing silently.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Record = dict[str, Any]
TextOf = Callable[[Record], str]
REASONS = ("empty", "too_short", "too_long", "exact_duplicate", "near_duplicate")

# Line breaks other than \n are mapped to \n (not deleted) so that words never get glued together.
_LINE_BREAKS = re.compile(r"\r\n?|[\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")  # Cc minus \t \n (line breaks done above)
_HSPACE = re.compile(r"[^\S\n]+")  # any whitespace except \n: spaces, tabs, NBSP, other Zs
_TRAILING = re.compile(r" +(?=\n)")
_MANY_NL = re.compile(r"\n{3,}")
_SPACES = re.compile(r" {2,}")
# LSH hit rate wanted for a pair exactly at the threshold; precision comes from jaccard().
_LSH_RECALL = 0.99


@dataclass
class CleanStats:
    """Row counts per drop reason; ``loaded`` is set by the loader, ``kept`` by each step."""

    loaded: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    kept: int = 0

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    def _reasons(self) -> tuple[str, ...]:
        return (*REASONS, *(r for r in self.dropped if r not in REASONS))

    def as_dict(self) -> dict[str, int]:
        """Flat row for a stats table; every known reason is present (zeros included)."""
        out = {"loaded": self.loaded, "kept": self.kept}
        out.update({f"dropped_{r}": self.dropped.get(r, 0) for r in self._reasons()})
        return out

    def describe_empty(self) -> str:
        """One sentence for the 'dataset empty after cleaning' error, naming the culprits."""
        parts = [f"{r} {self.dropped[r]}" for r in self._reasons() if self.dropped.get(r)]
        total = max(self.loaded, sum(self.dropped.values()))
        if total == 0:
            return "the input contained no rows"
        return f"all {total} rows were removed: {', '.join(parts) or 'no filter recorded a drop'}"


def normalize_text(
    text: str,
    *,
    unicode_form: Literal["NFC", "NFKC", "none"] = "NFKC",
    collapse_whitespace: bool = True,
) -> str:
    """Canonicalise text so that dedup and length filters see what a reader would see.

    Controls are removed *before* Unicode normalisation (removing them afterwards could bring a
    base letter next to a combining mark and break idempotence), so the result is idempotent.
    """
    if unicode_form not in ("NFC", "NFKC", "none"):
        raise ValueError(f"unicode_form must be 'NFC', 'NFKC' or 'none', got {unicode_form!r}")
    if text.isascii() and text.replace("\n", "").isprintable():
        return _normalize_plain(text) if collapse_whitespace else text
    text = _CONTROL.sub("", _LINE_BREAKS.sub("\n", text))
    if unicode_form != "none":
        text = unicodedata.normalize(unicode_form, text)
    if collapse_whitespace:
        text = _TRAILING.sub("", _HSPACE.sub(" ", text))
        text = _MANY_NL.sub("\n\n", text).strip()
    return text


def _normalize_plain(text: str) -> str:
    """normalize_text of printable ASCII and \n only, ~40x faster: no control or other line
    break to remove, Unicode forms are the identity, the only horizontal whitespace is " ", so
    each regex runs only where a cheap substring test says it can match."""
    if "  " in text:
        text = _SPACES.sub(" ", text)
    if " \n" in text:
        text = _TRAILING.sub("", text)
    if "\n\n\n" in text:
        text = _MANY_NL.sub("\n\n", text)
    return text.strip()


def filter_length(
    records: Iterable[Record],
    text_of: TextOf,
    *,
    min_chars: int,
    max_chars: int | None,
    stats: CleanStats,
) -> list[Record]:
    """Drop rows whose stripped text is empty, shorter than min_chars or longer than max_chars."""
    if min_chars < 0 or (max_chars is not None and max_chars < min_chars):
        raise ValueError(f"need 0 <= min_chars <= max_chars, got {min_chars}, {max_chars}")
    kept = []
    for rec in records:
        n = len(text_of(rec).strip())
        if n == 0:
            stats.drop("empty")
        elif n < min_chars:
            stats.drop("too_short")
        elif max_chars is not None and n > max_chars:
            stats.drop("too_long")
        else:
            kept.append(rec)
    stats.kept = len(kept)
    return kept


def _sha256(text: str) -> bytes:
    # surrogatepass: text decoded with errors="surrogateescape" must hash, not crash.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def exact_digest(text: str) -> bytes:
    """What exact dedup compares: the text ignoring case and whitespace differences."""
    return _sha256(" ".join(text.casefold().split()))


def split_digest(key: str, seed: int) -> bytes:
    """The rank of a row in the seeded split."""
    return _sha256(f"{seed}:{key}")


def exact_dedup(records: Iterable[Record], text_of: TextOf, stats: CleanStats) -> list[Record]:
    """Keep the first row of each text, ignoring case and whitespace differences."""
    seen: set[bytes] = set()
    kept = []
    for rec in records:
        digest = exact_digest(text_of(rec))
        if digest in seen:
            stats.drop("exact_duplicate")
        else:
            seen.add(digest)
            kept.append(rec)
    stats.kept = len(kept)
    return kept


def _shingles(text: str, size: int) -> list[bytes]:
    words = text.lower().split()
    grams = {" ".join(words[i : i + size]) for i in range(max(len(words) - size + 1, 1))}
    return [g.encode("utf-8", "surrogatepass") for g in sorted(grams)]


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """Bands b and rows r (b >= 2) with the most rows that still find pairs at the threshold.

    datasketch's own optimum finds only ~46% of pairs at J=0.85 and refuses threshold=1.0;
    since every candidate is verified with jaccard(), recall is what matters here.
    """
    for r in range(num_perm // 2, 0, -1):
        b = num_perm // r
        if 1.0 - (1.0 - threshold**r) ** b >= _LSH_RECALL:
            return b, r
    return num_perm, 1


def near_dedup(
    records: Iterable[Record],
    text_of: TextOf,
    stats: CleanStats,
    *,
    threshold: float = 0.85,
    num_perm: int = 128,
    shingle_size: int = 5,
    seed: int = 1,
) -> list[Record]:
    """Drop rows whose estimated word-shingle Jaccard with an earlier kept row is >= threshold.

    Greedy in input order: a row is compared only with rows already kept, so the first row of
    each group survives (A~B and B~C but not A~C keeps A and C). Deterministic for a fixed seed.
    """
    if not 0.0 < threshold <= 1.0 or num_perm < 2 or shingle_size < 1:
        raise ValueError("need 0 < threshold <= 1, num_perm >= 2 and shingle_size >= 1")
    records = list(records)
    shingles = (_shingles(text_of(rec), shingle_size) for rec in records)
    from datasketch import MinHash, MinHashLSH  # 2 s to import: only here

    hashes = MinHash.bulk(shingles, num_perm=num_perm, seed=seed)
    lsh = MinHashLSH(num_perm=num_perm, params=lsh_params(threshold, num_perm))
    matrix = np.array([mh.hashvalues for mh in hashes])  # one row per record
    kept = []
    for i, (rec, mh) in enumerate(zip(records, hashes, strict=True)):
        # Vectorised MinHash.jaccard (same formula): template-heavy data gives many candidates.
        candidates = lsh.query(mh)
        agree = (matrix[candidates] == matrix[i]).sum(axis=1).max() if candidates else 0
        if agree / num_perm >= threshold:
            stats.drop("near_duplicate")
        else:
            lsh.insert(i, mh)
            kept.append(rec)
    stats.kept = len(kept)
    return kept


def split_records(
    records: Iterable[Record],
    key_of: Callable[[Record], str],
    *,
    validation: float,
    test: float,
    seed: int,
) -> dict[str, list[Record]]:
    """Seeded split into train/validation/test by ranking rows on sha256(f"{seed}:{key}").

    Guaranteed: identical input and seed give identical output, and split membership does not
    depend on input order (except among rows with equal keys, ranked by input order). NOT
    guaranteed: adding rows shifts the cut-offs, so existing rows may change split. Rows with
    equal keys are adjacent in the ranking but can straddle a cut-off; dedup first.
    Test gets round(n*test) rows, validation round(n*validation) (each at least 1 when its
    fraction is > 0 and n >= 3); train always keeps at least one row when n >= 1.
    Within each split the input order is preserved.
    """
    if not (validation >= 0.0 and test >= 0.0 and validation + test < 1.0):  # rejects NaN too
        raise ValueError(f"need validation, test >= 0 and sum < 1, got {validation}, {test}")
    records = list(records)
    n = len(records)
    n_test, n_val = split_sizes(n, validation=validation, test=test)
    order = sorted(range(n), key=lambda i: split_digest(key_of(records[i]), seed))
    label = {i: "test" for i in order[:n_test]}
    label.update({i: "validation" for i in order[n_test : n_test + n_val]})
    out: dict[str, list[Record]] = {"train": [], "validation": [], "test": []}
    for i, rec in enumerate(records):
        out[label.get(i, "train")].append(rec)
    return out


def split_sizes(n: int, *, validation: float, test: float) -> tuple[int, int]:
    """(test rows, validation rows) of a split of n rows (see split_records)."""
    if not (validation >= 0.0 and test >= 0.0 and validation + test < 1.0):  # rejects NaN too
        raise ValueError(f"need validation, test >= 0 and sum < 1, got {validation}, {test}")
    n_test, n_val = round(n * test), round(n * validation)
    if n >= 3:
        n_test = max(n_test, 1) if test > 0 else 0
        n_val = max(n_val, 1) if validation > 0 else 0
    n_test = min(n_test, max(n - 1, 0))
    return n_test, min(n_val, max(n - 1 - n_test, 0))
