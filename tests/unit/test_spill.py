"""The data stage's dedup state stays small in memory as rows accumulate (issue #19)."""

import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from fasttrack.lib import minhash
from fasttrack.lib.cleaning import lsh_params
from fasttrack.lib.minhash import LshIndex, band_keys
from fasttrack.lib.spill import SignatureSpill


def test_spilled_signatures_read_back_exactly(tmp_path: Path) -> None:
    sigs = np.random.default_rng(0).integers(0, 2**32, (50, 8), dtype=np.uint32)
    spill = SignatureSpill(8, chunk=6, folder=tmp_path)
    assert [spill.append(s) for s in sigs] == list(range(50))
    ids = [0, 5, 6, 47, 49, 12]
    assert (spill.rows(ids) == sigs[ids]).all()
    assert list(tmp_path.iterdir()) == []  # unlinked: nothing left behind, even on SIGKILL
    assert spill.extend(sigs[:13]) == 50  # in bulk, across chunk ends
    assert (spill.rows([50, 55, 62]) == sigs[[0, 5, 12]]).all()
    spill.close()


def _grow(state, add, rows: int) -> float:
    """Bytes allocated (and still held) per row while `add` feeds `rows` rows in."""
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(0, rows, 1000):
        add(state, i)
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return held / rows


def test_dedup_state_memory_per_row_is_small(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was ~0.6 KB per kept row (signatures in memory, digests as Python bytes in a set)."""
    monkeypatch.setattr(minhash, "_CHUNK", 1000)
    bands, rows = lsh_params(0.85, 128)
    rng = np.random.default_rng(1)
    index = LshIndex(128, bands, rows, 0.85, tmp_path)

    def add_sigs(idx: LshIndex, _: int) -> None:
        sigs = rng.integers(0, 2**32, (1000, 128), dtype=np.uint32)
        assert idx.filter(sigs, band_keys(sigs, bands, rows)).all()

    # 16 bands x (8-byte key + 4-byte id) = 192 bytes; was ~0.7 KB with the signatures
    assert _grow(index, add_sigs, 20_000) < 250
    index.close()


def test_index_decisions_do_not_depend_on_spilling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(500)]
    texts = [" ".join(rng.choices(vocab, k=rng.randint(5, 40))) for _ in range(300)]
    texts += [t + " extra" for t in texts[:150] if len(t.split()) >= 30]
    bands, rows = lsh_params(0.85, 128)
    sigs = minhash.signatures(texts, num_perm=128, shingle_size=5, seed=1)
    keys = band_keys(sigs, bands, rows)

    def kept(spill: Path | None) -> list[bool]:
        index, out = LshIndex(128, bands, rows, 0.85, spill), []
        for start in range(0, len(texts), 5):
            out += index.filter(sigs[start : start + 5], keys[start : start + 5]).tolist()
        return out

    in_memory = kept(None)
    monkeypatch.setattr(minhash, "_CHUNK", 4)  # most candidates are read back from the file
    assert kept(tmp_path) == in_memory
    assert not all(in_memory)  # the planted copies were found
