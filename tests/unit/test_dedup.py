"""Dedup decided after the stream from spilled state (fasttrack/lib/dedup.py, issue #19)."""

import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from fasttrack.core.config import DataConfig
from fasttrack.lib import dataprep, dedup
from fasttrack.lib.cleaning import exact_digest, lsh_params
from fasttrack.lib.dedup import EXACT, KEEP, NEAR, Dedup, run_pairs
from fasttrack.lib.minhash import LshIndex, band_keys, signatures

VOCAB = [f"w{i}" for i in range(800)]


def _texts(n: int, seed: int) -> list[str]:
    """Random texts with planted exact copies and near copies (one word changed)."""
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(n):
        r = rng.random()
        if out and r < 0.1:
            out.append(rng.choice(out).upper())
        elif out and r < 0.3:
            words = rng.choice(out).split()
            words[rng.randrange(len(words))] = "changed"
            out.append(" ".join(words))
        else:
            out.append(" ".join(rng.choices(VOCAB, k=rng.randint(3, 60))))
    return out


def test_run_pairs_lists_every_pair_sharing_a_key_once() -> None:
    key = np.array([1, 1, 1, 4, 7, 7], np.uint64)
    row = np.array([2, 5, 9, 3, 0, 8], np.uint64)
    pairs = sorted(zip(*(a.tolist() for a in run_pairs(key, row)), strict=True))
    assert pairs == [(0, 8), (2, 5), (2, 9), (5, 9)]


@pytest.mark.parametrize("batch", [1, 7, 500])
def test_verdicts_equal_the_streaming_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch: int
) -> None:
    """Same drops as exact dedup by a set followed by `minhash.LshIndex` in input order,
    whatever the batch size and with candidate pairs spread over several pair files."""
    monkeypatch.setattr(dedup, "PAIR_ROWS", 64)
    monkeypatch.setattr(dedup, "_SIG_CHUNK", 16)  # most signatures are read back from disk
    texts = _texts(600, seed=batch)
    bands, rows = lsh_params(0.85, 128)
    sigs = signatures(texts, num_perm=128, shingle_size=5, seed=1)
    keys = band_keys(sigs, bands, rows)
    digests = [exact_digest(t)[:16] for t in texts]

    seen: set[bytes] = set()
    index, expected = LshIndex(128, bands, rows, 0.85), []
    for i, d in enumerate(digests):
        if d in seen:
            expected.append(EXACT)
            continue
        seen.add(d)
        expected.append(KEEP if index.filter(sigs[i : i + 1], keys[i : i + 1])[0] else NEAR)

    state = Dedup(exact=True, near=True, num_perm=128, bands=bands, threshold=0.85,
                  folder=tmp_path)  # fmt: skip
    for s in range(0, len(texts), batch):
        state.add(len(texts[s : s + batch]), digests[s : s + batch], sigs[s : s + batch],
                  keys[s : s + batch])  # fmt: skip
    got = state.decide().tolist()
    assert got == expected
    assert {EXACT, NEAR, KEEP} <= set(got)
    assert list(tmp_path.iterdir()) == []  # spilled files are unlinked


def test_stream_state_does_not_grow_with_rows(tmp_path: Path) -> None:
    """What the data stage holds in memory while rows stream in stays flat: it was ~0.2 KB per
    row in sorted band-key arrays and digests plus ~1.8 KB per recent row in Python dicts."""
    data = DataConfig.model_validate({"sources": [{"path": "x.jsonl", "format": "text"}]})
    opt = dataprep.Options.of(data)
    state = dataprep.KindState("corpus", opt, tmp_path / "_spool.parquet")
    texts = _texts(20_000, seed=3)
    work = [
        [{"text": t, "title": None} for t in texts[s : s + 1000]] for s in range(0, 20_000, 1000)
    ]
    batches = [dataprep.process_batch("corpus", w, opt) for w in work]
    state.add(batches[0])  # buffers of a fixed size are made here
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for b in batches[1:]:
        state.add(b)
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert held / 19_000 < 8  # bytes per row
