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


# resolved path -> ((size, mtime_ns, inode, ctime_ns), sha256) of an input file hashed for a
# stage key: one entry per path, replaced when the file changes, so a long-lived process (a
# server, a sweep) holds as many entries as it has distinct inputs, not one per version seen
_DIGESTS: dict[str, tuple[tuple[int, int, int, int], str]] = {}


def input_digest(path: str | Path) -> str:
    """sha256 of an input file that goes into a stage key, hashed once per process while its
    stat is unchanged: a run computes each key at least twice (Prefect's cache policy, then the
    task) and sweeps/servers many times, and re-reading a large corpus each time is most of a
    cached run's own work. Any write changes size, mtime_ns or ctime_ns; a replaced file changes
    the inode. Artifact integrity checks never use this (they must re-read the bytes)."""
    st = Path(path).stat()
    stamp = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    key = str(Path(path).resolve())
    seen = _DIGESTS.get(key)
    if seen is not None and seen[0] == stamp:
        return seen[1]
    digest = sha256_file(path)
    _DIGESTS[key] = (stamp, digest)
    return digest
