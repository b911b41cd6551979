"""Exact and near dedup decided after the stream, from state spilled to disk (issue #19).

Why: deciding row by row inside the stream needs an index of every kept row in memory (sorted
band keys, 192 B per row at 16 bands, digests, plus dicts of the recent rows), so the data
stage's RSS grew ~1.1 KB per row and a 10 GB corpus did not fit. Here the stream only appends
to files: (digest, row) and (band key, row) records, hash-partitioned into `PARTS` files, and
the signatures (`spill.SignatureSpill`). `decide()` then reads one partition at a time
(1/PARTS of the records): exact duplicates are the non-first rows of a digest; LSH candidate
pairs are rows sharing a band key, spilled by the later row's range and resolved in row order,
reading back only the candidates' signatures. Memory: one partition plus one byte per row (the
verdicts). The decisions are those of `minhash.LshIndex` fed the same rows in order (greedy: a
row is dropped when an earlier *kept* row shares a band bucket and its estimated Jaccard is
>= threshold); exact duplicates never enter the near-dedup.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import IO

import numpy as np

from fasttrack.lib.minhash import mix
from fasttrack.lib.spill import SignatureSpill

KEEP, EXACT, NEAR = 0, 1, 2
PARTS = 64  # record files per kind of record (a power of two: partition = top bits of the key)
PAIR_ROWS = 1 << 20  # candidate pairs are spilled in files of this many later rows
_SIG_CHUNK = 1 << 14  # signatures held in memory before they are written out (8 MB at 128)
_DIGEST = np.dtype([("d", "S16"), ("row", "<u8")])
_KEY = np.dtype([("key", "<u8"), ("row", "<u8")])
_PAIR = np.dtype([("j", "<u8"), ("i", "<u8")])  # j: the later row


class Partitions:
    """Append-only files of fixed-width records; unlinked temporary files (gone on SIGKILL)."""

    def __init__(self, dtype: np.dtype, parts: int, folder: Path | None) -> None:
        self.dtype = dtype
        # closed by close(); unlinked at creation, so nothing outlives the process
        self.files: list[IO[bytes]] = [tempfile.TemporaryFile(dir=folder) for _ in range(parts)]  # noqa: SIM115

    def add(self, records: np.ndarray, part: np.ndarray) -> None:
        """Append each record to file `part[k]` (records keep their order within a file)."""
        part = np.asarray(part, np.int64)
        order = np.argsort(part, kind="stable")
        records, part = records[order], part[order]
        bounds = np.searchsorted(part, np.arange(len(self.files) + 1))
        for p in np.flatnonzero(np.diff(bounds)).tolist():
            self.files[p].write(records[bounds[p] : bounds[p + 1]].tobytes())

    def read(self, p: int) -> np.ndarray:
        f = self.files[p]
        f.seek(0)
        out = np.frombuffer(f.read(), self.dtype)
        f.seek(0, 2)
        return out

    def close(self) -> None:
        for f in self.files:
            f.close()


def _band_salt(bands: int) -> np.ndarray:
    """Per-band constants: one key space for all bands without cross-band collisions."""
    return np.random.default_rng(0xBA4D).integers(1, 2**63, bands, dtype=np.uint64)


def run_pairs(key: np.ndarray, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(earlier, later) rows of every pair sharing a key; `key`, `row` sorted by (key, row)."""
    if len(key) < 2:
        return np.empty(0, np.uint64), np.empty(0, np.uint64)
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    lens = np.diff(np.r_[starts, len(key)])
    left = np.repeat(starts + lens, lens) - np.arange(len(key)) - 1  # rows after, same key
    firsts, seconds = [np.empty(0, row.dtype)], [np.empty(0, row.dtype)]
    cur, d = np.flatnonzero(left >= 1), 1
    while len(cur):  # total work: the number of pairs
        firsts.append(row[cur])
        seconds.append(row[cur + d])
        d += 1
        cur = cur[left[cur] >= d]
    return np.concatenate(firsts), np.concatenate(seconds)


class Dedup:
    """The dedup state of one dataset kind; rows are numbered in input order by `add`."""

    def __init__(
        self,
        *,
        exact: bool,
        near: bool,
        num_perm: int,
        bands: int,
        threshold: float,
        folder: Path | None = None,
    ) -> None:
        self.rows, self.num_perm, self.threshold, self.folder = 0, num_perm, threshold, folder
        self.exact = Partitions(_DIGEST, PARTS, folder) if exact else None
        self.near = Partitions(_KEY, PARTS, folder) if near else None
        self.sigs = SignatureSpill(num_perm, _SIG_CHUNK, folder) if near else None
        self.salt = _band_salt(bands)

    def add(
        self, n: int, digests: list[bytes], sigs: np.ndarray | None, keys: np.ndarray | None
    ) -> None:
        """The next `n` rows: their exact digests (16 bytes) and MinHash signatures/band keys."""
        rows = np.arange(self.rows, self.rows + n, dtype=np.uint64)
        self.rows += n
        if self.exact is not None and n:
            rec = np.empty(n, _DIGEST)
            rec["d"], rec["row"] = digests, rows
            first = np.frombuffer(b"".join(digests), np.uint8)[::16]
            self.exact.add(rec, first % PARTS)
        if self.near is not None and sigs is not None and keys is not None and n:
            assert self.sigs is not None
            self.sigs.extend(sigs)
            with np.errstate(over="ignore"):
                salted = mix(keys ^ self.salt[None, :]).ravel()
            rec = np.empty(len(salted), _KEY)
            rec["key"], rec["row"] = salted, np.repeat(rows, keys.shape[1])
            self.near.add(rec, salted >> np.uint64(64 - PARTS.bit_length() + 1))

    def decide(self) -> np.ndarray:
        """Per row: KEEP, EXACT or NEAR (uint8)."""
        verdict = np.zeros(self.rows, np.uint8)
        if self.exact is not None:
            for p in range(PARTS):
                rec = self.exact.read(p)
                _, first = np.unique(rec["d"], return_index=True)  # first occurrences
                dup = np.ones(len(rec), bool)
                dup[first] = False
                verdict[rec["row"][dup]] = EXACT
            self.exact.close()
        if self.near is not None:
            self._near(verdict)
            self.near.close()
        return verdict

    def _near(self, verdict: np.ndarray) -> None:
        assert self.near is not None and self.sigs is not None
        pairs = Partitions(_PAIR, self.rows // PAIR_ROWS + 1, self.folder)
        for p in range(PARTS):
            rec = self.near.read(p)
            rec = rec[verdict[rec["row"]] == KEEP]
            order = np.lexsort((rec["row"], rec["key"]))
            i, j = run_pairs(rec["key"][order], rec["row"][order])
            out = np.empty(len(i), _PAIR)
            out["j"], out["i"] = j, i
            pairs.add(out, j // np.uint64(PAIR_ROWS))
        for f in range(len(pairs.files)):
            todo = np.unique(pairs.read(f))  # sorted by (later row, earlier row); bands merged
            last, sig_j = -1, None
            for j, i in zip(todo["j"].tolist(), todo["i"].tolist(), strict=True):
                if verdict[j] or verdict[i]:  # j already dropped, or i was not kept
                    continue
                if j != last:
                    last, sig_j = j, self.sigs.rows([j])[0]
                same = (self.sigs.rows([i])[0] == sig_j).sum()
                if same / self.num_perm >= self.threshold:  # as LshIndex compares
                    verdict[j] = NEAR
        pairs.close()
        self.sigs.close()
