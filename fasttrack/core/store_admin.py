"""Store administration: `fasttrack verify` (re-hash everything) and `fasttrack gc` (free space).

**Referenced** (kept by gc, whatever its age) is the upstream closure, through the manifests'
`upstream` keys, of these roots:
  - every promoted model in `promoted.json` (what a deployment serves),
  - the newest `report` artifact of each run (config) name (what `fasttrack report` re-prints),
  - every artifact *used* within the age: published, or found intact by a lookup (the lookup stamp
    in `verified/` records it), so a run in progress never loses an upstream it already looked up
    and a young artifact never loses the inputs it was built from.
Everything else older than the age is garbage. Removal takes the key's lock without waiting
(a key being built right now is skipped) and first renames the directory into `tmp/` (local) or
drops its manifest (remote), so no reader ever sees a half-deleted artifact as complete.
Quarantined artifacts are never collected: they are evidence; inspect and delete them by hand.
Work dirs (training checkpoints of interrupted runs) unchanged for longer than the age go too.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import Timeout

from fasttrack.core.errors import FastTrackError, StoreError
from fasttrack.core.integrity import last_used, quarantine, stamp_path
from fasttrack.core.store import MANIFEST, PROMOTED, ArtifactRef, ArtifactStore

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_AGE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


def parse_age(text: str) -> float:
    """'7d', '12h', '30m', '90s', '2w' -> seconds."""
    m = _AGE_RE.match(text)
    if not m:
        raise FastTrackError(f"--older-than {text!r}: expected a number and s/m/h/d/w, e.g. 7d")
    return float(m[1]) * _UNITS[m[2]]


@dataclass
class Finding:
    stage: str
    key: str
    problems: list[str]
    quarantined_to: str | None = None


def verify_all(store: ArtifactStore, fix: bool = True) -> tuple[int, list[Finding]]:
    """(artifacts checked, findings): every file of every manifest re-hashed, no stamps trusted;
    a directory with an unreadable manifest is corrupt, a symlinked one is refused.

    With `fix`, a corrupt artifact is quarantined under its key's lock after a re-check."""
    manifests, broken = store.scan()
    findings = [Finding(b.stage, b.key, [b.problem]) for b in broken if b.symlink]
    todo = [(m["stage"], m["key"]) for m in manifests] + [
        (b.stage, b.key) for b in broken if not b.symlink
    ]
    for stage, key in sorted(todo):
        if not (problems := store.verify(stage, key)):
            continue
        finding = Finding(stage, key, problems)
        if fix:
            with store.lock(stage, key):
                if problems := store.verify(stage, key):  # still corrupt (not just rebuilt)?
                    finding.problems = problems
                    finding.quarantined_to = quarantine(store, stage, key, problems)
        findings.append(finding)
    return len(manifests) + len(broken), findings


def _promoted_keys(store: ArtifactStore) -> set[str]:
    try:
        with store.fs.open(f"{store.root}/{PROMOTED}", "rb") as f:
            promoted = json.loads(f.read())
    except (FileNotFoundError, json.JSONDecodeError):
        return set()
    return {rec["promoted"] for rec in promoted.values() if isinstance(rec, dict)}


def referenced(
    store: ArtifactStore, manifests: list[dict[str, Any]], max_age_s: float, now: float
) -> dict[str, str]:
    """key -> why it is kept (see the module docstring)."""
    by_key = {m["key"]: m for m in manifests}
    roots = {k: "promoted" for k in _promoted_keys(store)}
    newest: dict[str, dict[str, Any]] = {}
    for m in manifests:
        if m["stage"] == "report":
            run = m.get("run", "?")
            if run not in newest or m["created_at"] > newest[run]["created_at"]:
                newest[run] = m
    roots |= {m["key"]: f"newest report of {run}" for run, m in newest.items()}
    roots |= {m["key"]: "used recently" for m in manifests if now - last_used(store, m) < max_age_s}
    keep, todo = {}, list(roots.items())
    while todo:
        key, why = todo.pop()
        if key in keep:
            continue
        keep[key] = why
        for up in by_key.get(key, {}).get("upstream", {}).values():
            todo.append((up, f"upstream of {by_key[key]['stage']} {key[:12]} ({why})"))
    return keep


@dataclass
class GcResult:
    removed: list[tuple[str, str, int]] = field(default_factory=list)  # stage, key, bytes
    kept: int = 0
    busy: list[str] = field(default_factory=list)
    work_dirs: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)  # kept: `fasttrack verify` quarantines

    @property
    def freed(self) -> int:
        return sum(size for *_, size in self.removed)


def gc(store: ArtifactStore, max_age_s: float, dry_run: bool = False) -> GcResult:
    """Remove unreferenced artifacts (and stale work dirs) older than `max_age_s`.

    Refuses to run while the store holds a symlinked artifact (what it was built from cannot
    be trusted to stay referenced); artifacts with a corrupt manifest are kept and reported
    (`fasttrack verify` quarantines them)."""
    now, (manifests, broken), result = time.time(), store.scan(), GcResult()
    if links := [b.problem for b in broken if b.symlink]:
        raise StoreError(f"gc: nothing removed: {links[0]}" + (
            f" (and {len(links) - 1} more)" if len(links) > 1 else ""))  # fmt: skip
    result.corrupt = [f"{b.stage}/{b.key}: {b.problem}" for b in broken]
    keep = referenced(store, manifests, max_age_s, now)
    for m in manifests:
        stage, key = m["stage"], m["key"]
        if key in keep:
            result.kept += 1
            continue
        size = sum(f["size"] for f in m["files"])
        if dry_run:
            result.removed.append((stage, key, size))
            continue
        try:
            with store.lock(stage, key, timeout=0):
                _remove(store, stage, key)
        except Timeout:
            result.busy.append(f"{stage}/{key}")
            continue
        result.removed.append((stage, key, size))
    result.work_dirs = _stale_work_dirs(store, max_age_s, now, dry_run)
    if not dry_run:
        store.clean_tmp()
    return result


def _remove(store: ArtifactStore, stage: str, key: str) -> None:
    final = f"{store.root}/{stage}/{key}"
    if store.local:
        trash = store.scratch / "tmp" / f"gc-{uuid.uuid4().hex}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        Path(final).rename(trash)  # atomic: the artifact is gone or whole, never half
        shutil.rmtree(trash, ignore_errors=True)
    else:
        store.fs.rm(f"{final}/{MANIFEST}")  # no longer an artifact before any data goes
        store.fs.rm(final, recursive=True)
    stamp_path(store, stage, key).unlink(missing_ok=True)


def _stale_work_dirs(store: ArtifactStore, max_age_s: float, now: float, dry_run: bool) -> list:
    """Checkpoint dirs untouched for `max_age_s` whose key nobody is building right now."""
    out = []
    for path in sorted((store.scratch / "work").glob("*/*")):
        newest = max((p.stat().st_mtime for p in path.rglob("*")), default=path.stat().st_mtime)
        if now - newest < max_age_s:
            continue
        try:
            with store.lock(path.parent.name, path.name, timeout=0):
                if not dry_run:
                    shutil.rmtree(path, ignore_errors=True)
        except (Timeout, StoreError):  # being built now, or not a work dir of ours
            continue
        out.append(str(path))
    return out


def find_report(store: ArtifactStore, run: str = "latest") -> tuple[dict, Path]:
    """(manifest, report.md path) of the newest report of run `run` (a config name) or of any.
    Here, not in the report stage, so `fasttrack report`/`compare` answer without importing the
    stages."""
    reports = [m for m in store.manifests() if m["stage"] == "report"]
    if run != "latest":
        reports = [m for m in reports if m.get("run") == run]
    if not reports:
        names = sorted({m.get("run", "?") for m in store.manifests() if m["stage"] == "report"})
        raise FastTrackError(
            f"report: no report of {run!r} in {store.url} (runs: {', '.join(names) or 'none'})"
        )
    newest = max(reports, key=lambda m: m["created_at"])
    ref = ArtifactRef(stage="report", key=newest["key"], uri=store.uri("report", newest["key"]))
    return newest, store.local_path(ref) / "report.md"
