"""MinHash signatures computed a batch at a time, and a greedy LSH index that holds no texts.

Why not datasketch here: `MinHash.bulk` hashes every shingle string with SHA-1 in Python and
`MinHashLSH` keeps ~1.5 KB of Python objects per row and band; at corpus scale (millions of
rows) that is the whole time and memory budget. Here words are hashed once (crc32, C), shingles
are rolled in numpy, and the permutations (multiply-shift, 2-universal) run vectorised over a
whole batch. Buckets of older rows live in sorted numpy arrays (12 bytes per row and band), and
the signatures kept to verify candidates are spilled to an unlinked temporary file
(`spill.SignatureSpill`), so the index costs ~0.2 KB of memory per kept row (16 bands at
the default threshold 0.85).
The semantics are those of `cleaning.near_dedup`: greedy in input order, a row is dropped when
the estimated Jaccard with an earlier *kept* row is >= threshold. The data stage decides the
same thing after the stream from spilled state (`dedup.Dedup`, flat memory); `LshIndex` is the
in-order reference it is tested against (tests/unit/test_dedup.py).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fasttrack.lib.spill import SignatureSpill

_P = np.uint64(0x100000001B3)  # FNV prime: rolls word hashes into shingle hashes
_CHUNK = 1 << 16  # signatures are stored in chunks of this many rows (no big re-allocations)
_MAX_CELLS = 1 << 19  # permutations x shingles evaluated at once (4 MB: stays in cache)


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads crc32/rolling-hash structure over all 64 bits."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shingle_hashes(texts: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of the word `size`-grams of each lower-cased text (the whole text when it
    is shorter), concatenated, and the index where each text's hashes start.

    Vectorised over the batch with Arrow: words are split and dictionary-encoded in C, so only
    the batch's distinct words are hashed in Python (crc32), and the n-grams are rolled in numpy.
    """
    words = pc.utf8_split_whitespace(pa.array([t.lower() for t in texts], pa.large_string()))
    offsets = words.offsets.to_numpy().astype(np.int64)
    encoded = pc.dictionary_encode(words.flatten())
    distinct = encoded.dictionary.to_pylist()
    table = np.fromiter(
        (zlib.crc32(w.encode("utf-8", "surrogatepass")) for w in distinct),
        np.uint64,
        count=len(distinct),
    )
    wh = table[encoded.indices.to_numpy(zero_copy_only=False)]
    n = np.diff(offsets)
    k = np.minimum(n, size)  # words per gram: size, or the whole (short) text
    count = np.maximum(n - size + 1, 1)
    first = np.repeat(offsets[:-1], count)
    pos = first + np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    width = np.repeat(k, count)
    acc = np.zeros(len(pos), np.uint64)
    full = bool((k == size).all())  # no short text: every gram has `size` words, no masks
    with np.errstate(over="ignore"):
        for j in range(size):
            if full:
                acc *= _P
                acc += wh[pos + j]
                continue
            live = width > j  # grams of `width` words take words pos .. pos+width-1
            acc[live] = acc[live] * _P + wh[pos[live] + j]
        out = mix(acc) >> np.uint64(32)
    return out, np.cumsum(count) - count


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, num_perm, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
    return a[:, None], b[:, None]


def signatures(texts: list[str], *, num_perm: int, shingle_size: int, seed: int) -> np.ndarray:
    """(len(texts), num_perm) uint32 MinHash signatures (a text with no word: one empty gram)."""
    hashes, starts = shingle_hashes(texts, shingle_size)
    x = hashes[None, :]
    a, b = permutations(num_perm, seed)
    out = np.empty((num_perm, len(texts)), np.uint32)
    step = max(1, _MAX_CELLS // max(x.shape[1], 1))
    buf = np.empty((min(step, num_perm), x.shape[1]), np.uint64)
    with np.errstate(over="ignore"):
        for i in range(0, num_perm, step):
            h = buf[: len(a[i : i + step])]
            np.multiply(a[i : i + step], x, out=h)  # in place: no temporaries of this size
            np.add(h, b[i : i + step], out=h)
            # the top 32 bits of the minimum == the minimum of the top 32 bits (x >> 32 is
            # monotone): shifting the per-text minima instead of every cell saves two passes
            out[i : i + step] = np.minimum.reduceat(h, starts, axis=1) >> np.uint64(32)
    return np.ascontiguousarray(out.T)


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint64 bucket keys; equal band values give equal keys (collisions only add
    candidates, which are verified against the signatures)."""
    mult = permutations(rows, 0x5EED)[0][:, 0]
    cut = sigs[:, : bands * rows].astype(np.uint64).reshape(len(sigs), bands, rows)
    with np.errstate(over="ignore"):
        return mix((cut * mult).sum(axis=2, dtype=np.uint64))


class LshIndex:
    """Greedy near-duplicate filter over MinHash signatures (see the module docstring)."""

    def __init__(
        self, num_perm: int, bands: int, rows: int, threshold: float, spill: Path | None = None
    ) -> None:
        """`spill`: a folder for the signatures file (None: they stay in memory)."""
        self.num_perm, self.bands, self.rows, self.threshold = num_perm, bands, rows, threshold
        self.sigs = SignatureSpill(num_perm, _CHUNK, spill)
        self.recent: list[dict[int, int | list[int]]] = [{} for _ in range(bands)]
        self.recent_rows = 0
        self.keys = [np.empty(0, np.uint64) for _ in range(bands)]
        self.ids = [np.empty(0, np.uint32) for _ in range(bands)]

    def filter(self, sigs: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Keep-mask for a batch in input order; kept rows join the index."""
        old = self._frozen_candidates(keys)
        keep = np.ones(len(sigs), bool)
        for i, row_keys in enumerate(keys.tolist()):
            cand = old.get(i, set())
            for bucket, key in zip(self.recent, row_keys, strict=True):
                hit = bucket.get(key)
                if isinstance(hit, list):
                    cand.update(hit)
                elif hit is not None:
                    cand.add(hit)
            if cand:
                stored = self.sigs.rows(sorted(cand))
                if (stored == sigs[i]).sum(axis=1).max() / self.num_perm >= self.threshold:
                    keep[i] = False
                    continue
            self._add(sigs[i], row_keys)
        if self.recent_rows >= _CHUNK:
            self._freeze()
        return keep

    def _add(self, sig: np.ndarray, row_keys: list[int]) -> None:
        idx = self.sigs.append(sig)
        self.recent_rows += 1
        for bucket, key in zip(self.recent, row_keys, strict=True):
            hit = bucket.get(key)
            if hit is None:
                bucket[key] = idx
            elif isinstance(hit, list):
                hit.append(idx)
            else:
                bucket[key] = [hit, idx]

    def _frozen_candidates(self, keys: np.ndarray) -> dict[int, set[int]]:
        out: dict[int, set[int]] = {}
        for band in range(self.bands):
            if not len(self.keys[band]):
                continue
            q = keys[:, band]
            lo = np.searchsorted(self.keys[band], q, "left")
            hi = np.searchsorted(self.keys[band], q, "right")
            for i in np.nonzero(hi > lo)[0].tolist():
                out.setdefault(i, set()).update(self.ids[band][lo[i] : hi[i]].tolist())
        return out

    def _freeze(self) -> None:
        """Move the recent buckets into the sorted arrays (12 bytes per row and band)."""
        for band, bucket in enumerate(self.recent):
            pairs = [(k, v) for k, hit in bucket.items() for v in (hit if isinstance(hit, list)
                                                                   else (hit,))]  # fmt: skip
            keys = np.fromiter((k for k, _ in pairs), np.uint64, count=len(pairs))
            ids = np.fromiter((v for _, v in pairs), np.uint32, count=len(pairs))
            order = np.argsort(keys, kind="stable")
            keys, ids = keys[order], ids[order]
            # a linear merge (insert the sorted new pairs), not a re-sort of the whole index
            at = np.searchsorted(self.keys[band], keys, "right")
            self.keys[band] = np.insert(self.keys[band], at, keys)
            self.ids[band] = np.insert(self.ids[band], at, ids)
        self.recent = [{} for _ in range(self.bands)]
        self.recent_rows = 0

    def close(self) -> None:
        self.sigs.close()
