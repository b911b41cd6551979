"""MinHash signatures spilled to disk, so the dedup state does not grow in memory with the corpus.

Why: a signature is 4 bytes x num_perm (~0.5 KB) per row, and it is only read back to verify
LSH candidates (a few per cent of rows), so it lives in an unlinked temporary file (nothing left
behind even under SIGKILL) and is read with `os.pread`. Used by `dedup.Dedup` (the data stage)
and `minhash.LshIndex` (the in-order reference the spilled dedup is tested against).
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
        return self.extend(sig[None, :])

    def extend(self, sigs: np.ndarray) -> int:
        """Store rows (n, width); returns the index of the first."""
        first = self.size
        while len(sigs):
            at = self.size - self.flushed
            part, sigs = sigs[: self.chunk - at], sigs[self.chunk - at :]
            self.buffer[at : at + len(part)] = part
            self.size += len(part)
            if self.size - self.flushed == self.chunk:
                if self.file is not None:
                    self.file.write(self.buffer.tobytes())
                    self.file.flush()
                else:
                    self.frozen.append(self.buffer.copy())
                self.flushed = self.size
        return first

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
