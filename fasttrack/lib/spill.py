"""Dedup state that does not grow in memory with the corpus: spilled signatures, packed digests.

Why: the data stage's main process held every kept row's MinHash signature (4 bytes x num_perm,
~0.5 KB) and every exact digest as a Python `bytes` in a set (~90 bytes with the set slot), so
its RSS grew ~0.7 KB per kept row. Signatures are only read back to verify LSH candidates (a
few per cent of rows), so they live in an unlinked temporary file (nothing left behind even
under SIGKILL) and are read with `os.pread`; digests live in sorted fixed-width numpy arrays
(16 bytes per row) with a small recent set in front.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np


class SignatureSpill:
    """Append-only (n, width) uint32 rows: the last `chunk` rows in memory, the rest on disk."""

    def __init__(self, width: int, chunk: int, folder: Path | None = None) -> None:
        self.width, self.chunk = width, chunk
        # closed by close(); unlinked at creation, so nothing outlives the process
        self.file = tempfile.TemporaryFile(dir=folder) if folder is not None else None  # noqa: SIM115
        self.flushed = 0  # rows on disk (or in `self.frozen` without a folder)
        self.frozen: list[np.ndarray] = []  # full chunks, only when there is no folder
        self.buffer = np.empty((chunk, width), np.uint32)
        self.size = 0

    def append(self, sig: np.ndarray) -> int:
        """Store one row; returns its index."""
        idx = self.size
        self.buffer[idx - self.flushed] = sig
        self.size += 1
        if self.size - self.flushed == self.chunk:
            if self.file is not None:
                self.file.write(self.buffer.tobytes())
                self.file.flush()
            else:
                self.frozen.append(self.buffer.copy())
            self.flushed = self.size
        return idx

    def rows(self, ids: list[int]) -> np.ndarray:
        """(len(ids), width) rows by index."""
        out = np.empty((len(ids), self.width), np.uint32)
        nbytes = 4 * self.width
        for j, idx in enumerate(ids):
            if idx >= self.flushed:
                out[j] = self.buffer[idx - self.flushed]
            elif self.file is None:
                out[j] = self.frozen[idx // self.chunk][idx % self.chunk]
            else:
                raw = os.pread(self.file.fileno(), nbytes, idx * nbytes)
                out[j] = np.frombuffer(raw, np.uint32)
        return out

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class DigestSet:
    """A set of fixed-width byte strings: sorted numpy arrays plus a recent Python set.

    `add_new` answers "was it there?" and adds it, exactly like `x in set; set.add(x)`; memory
    is `width` bytes per member once the recent set (at most `recent` members) is merged.
    """

    def __init__(self, width: int = 16, recent: int = 1 << 16) -> None:
        self.dtype = np.dtype(f"S{width}")
        self.limit = recent
        self.sorted = np.empty(0, self.dtype)
        self.recent: set[bytes] = set()

    def __len__(self) -> int:
        return len(self.sorted) + len(self.recent)

    def add_new(self, digest: bytes) -> bool:
        """True when `digest` was not a member (it is one now)."""
        if digest in self.recent or self._in_sorted(digest):
            return False
        self.recent.add(digest)
        if len(self.recent) >= self.limit:
            fresh = np.array(sorted(self.recent), self.dtype)
            # a linear merge, not a re-sort: n / recent merges cost O(n^2 / recent) copying
            self.sorted = np.insert(self.sorted, np.searchsorted(self.sorted, fresh), fresh)
            self.recent = set()
        return True

    def _in_sorted(self, digest: bytes) -> bool:
        if not len(self.sorted):
            return False
        i = int(np.searchsorted(self.sorted, digest))
        return i < len(self.sorted) and self.sorted[i : i + 1].tobytes() == digest  # no S-strip
