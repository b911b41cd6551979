"""Integrity of published artifacts: verified on lookup, quarantined when corrupt, never reused.

`ArtifactStore.lookup` only checks that every listed file exists at its size: that catches a
truncated or missing file, not flipped bytes. Hashing every file on *every* lookup would re-read a
multi-GB model several times per run (the cache policy, the task and the re-check under the lock
each look up), and again on every cached re-run. So `check` hashes an artifact's files in full
once and then records a *stamp* per file, (inode, size, mtime_ns, ctime_ns), in memory and in
`<scratch>/verified/<stage>/<key>.json`; a later lookup re-hashes only files whose stamp differs.
Any write, truncation, replacement or `touch` through the filesystem changes ctime (user space
cannot set it), so a modified file is always re-hashed. A stamp is trusted only for files that were
unchanged for RACY_S before it was taken (timestamps are coarse: git's "racy clean" problem).
What a stamp cannot see is silent media corruption under unchanged metadata (bit rot): that is
what `fasttrack verify` (a full re-hash, e.g. scheduled) is for. `FASTTRACK_VERIFY=full` ignores
persisted stamps (one full hash per artifact per process). Remote (fsspec) stores are not hashed
on lookup, which would mean downloading: `ArtifactStore.local_path` verifies what it fetches.

A corrupt artifact is moved under `<root>/quarantine/<stage>/` (never deleted: it may be the only
copy of days of training) with a `.json` note of what was wrong, and the stage rebuilds the key.
Quarantine happens under the key's lock after a re-check, so a process can never move away an
artifact that another process has just rebuilt.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fasttrack.core.store import ArtifactRef, ArtifactStore, CorruptArtifact, sha256_file

RACY_S = 2.0
_MEMO: dict[tuple[str, str, str], dict[str, Any]] = {}


def _signature(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def stamp_path(store: ArtifactStore, stage: str, key: str) -> Path:
    return store.scratch / "verified" / stage / f"{key}.json"


def _load_stamp(store: ArtifactStore, stage: str, key: str) -> dict[str, Any]:
    memo = _MEMO.get((store.root, stage, key))
    if memo is not None or os.environ.get("FASTTRACK_VERIFY") == "full":
        return memo or {}
    try:
        return json.loads(stamp_path(store, stage, key).read_text())
    except (OSError, ValueError):
        return {}


def _trusted(stamp: dict[str, Any], name: str, sig: list[int]) -> bool:
    old = stamp.get("files", {}).get(name)
    return old == sig and sig[3] / 1e9 < stamp.get("verified_at", 0) - RACY_S


def _save_stamp(store: ArtifactStore, stage: str, key: str, stamp: dict[str, Any]) -> None:
    _MEMO[(store.root, stage, key)] = stamp
    path = stamp_path(store, stage, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(stamp))
        tmp.replace(path)  # its mtime doubles as "last used" for `fasttrack gc`
    except OSError:  # a read-only store can still be used; only the memo is lost
        pass


def check(store: ArtifactStore, stage: str, key: str) -> tuple[ArtifactRef | None, list[str]]:
    """(ref, []) if intact; (None, problems) if corrupt; (None, []) if there is no artifact.
    A symlinked artifact raises `SymlinkedArtifact` (refused, see tasks/store.py)."""
    try:
        manifest = store.read_manifest(stage, key)
    except CorruptArtifact as exc:
        return None, [str(exc)]
    if manifest is None:
        return None, []
    if not store.local:
        ref = store.lookup(stage, key)
        return ref, [] if ref else ["a listed file is missing or has the wrong size"]
    base = Path(store.uri(stage, key))
    started = time.time()
    stamp, sigs, problems = _load_stamp(store, stage, key), {}, []
    for entry in manifest["files"]:
        name = entry["path"]
        try:
            sig = sigs[name] = _signature(base / name)
        except FileNotFoundError:
            problems.append(f"{name}: missing")
            continue
        if _trusted(stamp, name, sig):
            continue
        if sig[1] != entry["size"]:
            problems.append(f"{name}: size {sig[1]} != {entry['size']} in the manifest")
        elif sha256_file(base / name) != entry["sha256"]:
            problems.append(f"{name}: sha256 mismatch")
    if problems:
        _MEMO.pop((store.root, stage, key), None)
        return None, problems
    # Files trusted from the old stamp stay trusted under the new time; re-hashed ones count
    # from `started`, so a file changed while it was hashed is re-hashed next time.
    _save_stamp(store, stage, key, {"verified_at": started, "files": sigs})
    return store.lookup(stage, key), []


def quarantine(store: ArtifactStore, stage: str, key: str, problems: list[str]) -> str | None:
    """Move an artifact under `<root>/quarantine/<stage>/` with a note; None if already gone.

    Call it holding `store.lock(stage, key)`, after a re-check (see `checked_lookup`)."""
    store.uri(stage, key)  # validates stage and key
    src = f"{store.root}/{stage}/{key}"
    when = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    rel = f"quarantine/{stage}/{key}-{when}-{uuid.uuid4().hex[:8]}"
    dest = f"{store.root}/{rel}"
    try:
        if store.local:
            Path(dest).parent.mkdir(parents=True, exist_ok=True)
            os.rename(src, dest)
        else:
            store.fs.mv(src, dest, recursive=True)
    except FileNotFoundError:
        return None
    note = {"stage": stage, "key": key, "problems": problems, "at": when,
            "host": socket.gethostname(), "pid": os.getpid()}  # fmt: skip
    store.fs.pipe_file(f"{dest}.json", json.dumps(note, indent=2).encode())
    _MEMO.pop((store.root, stage, key), None)
    stamp_path(store, stage, key).unlink(missing_ok=True)
    from fasttrack.core.log import get_logger  # stage.py imports this module

    get_logger().warning(
        "%s/%s: corrupt artifact quarantined to %s (%s)", stage, key[:12], dest, "; ".join(problems)
    )
    return dest


def checked_lookup(
    store: ArtifactStore, stage: str, key: str, fix: bool = False
) -> ArtifactRef | None:
    """The ref of an intact artifact, else None. With `fix` (hold the key's lock), a corrupt
    artifact is quarantined so the caller can rebuild the key."""
    ref, problems = check(store, stage, key)
    if problems and fix:
        quarantine(store, stage, key, problems)
    return ref


def last_used(store: ArtifactStore, manifest: dict[str, Any]) -> float:
    """When an artifact was last published or found intact by a lookup (epoch seconds)."""
    created = datetime.fromisoformat(manifest["created_at"]).timestamp()
    try:
        return max(created, stamp_path(store, manifest["stage"], manifest["key"]).stat().st_mtime)
    except OSError:
        return created
