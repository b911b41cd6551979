"""File-level primitives shared by the local and the remote store (no store logic here)."""

from __future__ import annotations

import hashlib
from pathlib import Path

MANIFEST = "manifest.json"  # an artifact exists exactly when this file does (written last)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
