"""Content-addressed artifact store: `<root>/<stage>/<key>/` + `manifest.json`, on any fsspec URL.

Why this shape: the store, not Prefect's result cache, is the source of truth. An artifact is
complete exactly when its manifest exists and lists files that are all present, and the manifest
is written last (local: a staging dir renamed into place; object stores: files under a writer's
own prefix, then the manifest naming it, see `store_remote`), so a crash can leave only staging
litter, never a half artifact that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import fsspec
from filelock import FileLock
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ConfigDict

from fasttrack.core import store_remote
from fasttrack.core.errors import StoreError
from fasttrack.core.files import MANIFEST, sha256_file

PROMOTED = "promoted.json"  # gates record each config's promoted model here
_STAGE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_RESERVED = {"tmp", "work", "locks", "quarantine", "verified"}
_VERSIONED = ("torch", "transformers", "tokenizers", "datasets", "peft", "trl", "accelerate",
              "bitsandbytes", "prefect", "numpy", "pyarrow", "llm-fasttrack", "rouge-score",
              "sacrebleu", "sentence-transformers", "faiss-cpu", "lm-eval", "onnxruntime",
              "openvino")  # fmt: skip


class CorruptArtifact(StoreError):
    """An artifact directory whose manifest is missing or unreadable: quarantined on lookup."""


class SymlinkedArtifact(StoreError):
    """A stage or artifact directory that is a symlink: refused everywhere."""


@dataclass(frozen=True)
class Broken:
    """An artifact directory that is not a usable artifact, and why."""

    stage: str
    key: str
    problem: str
    symlink: bool = False


class ArtifactRef(BaseModel):
    """What a stage returns: small, serialisable, enough to find the artifact again."""

    model_config = ConfigDict(frozen=True)
    stage: str
    key: str
    uri: str
    metrics: dict[str, Any] = {}
    reused: bool = False  # True when this call found the artifact instead of building it

    @property
    def short(self) -> str:
        return self.key[:12]


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, so equal configs hash equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def compute_key(
    stage: str,
    version: str,
    config: Any,
    upstream: dict[str, str] | None = None,
    inputs: dict[str, str] | None = None,
) -> str:
    """sha256 over everything that determines a stage's output (see DESIGN.md)."""
    if isinstance(config, BaseModel):
        config = config.model_dump(mode="json")
    payload = {
        "stage": stage,
        "version": version,
        "config": config,
        "upstream": upstream or {},
        "inputs": inputs or {},
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def library_versions() -> dict[str, str]:
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ArtifactStore:
    """Publish, find and fetch artifacts under a root that is a local path or an fsspec URL."""

    def __init__(self, url: Any = "artifacts", cache_dir: str | Path | None = None):
        """`url`: a path, an fsspec URL, or the config's `StoreConfig` (URL + credentials)."""
        self.url, options = store_remote.resolve(url)
        self.fs, root = fsspec.core.url_to_fs(self.url, **options)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = os.path.abspath(root) if self.local else root.rstrip("/")
        default_cache = Path(os.environ.get("FASTTRACK_CACHE", Path.home() / ".cache/fasttrack"))
        self.cache = Path(cache_dir) if cache_dir else default_cache
        # Local scratch (staging, checkpoints, locks) lives in the store when it is local, so a
        # rename publishes atomically; for remote stores it lives in the local cache.
        self.scratch = Path(self.root) if self.local else self.cache / "scratch"

    # ---- paths -------------------------------------------------------------------------
    def _dir(self, stage: str, key: str) -> str:
        if not _STAGE_RE.match(stage) or stage in _RESERVED:
            raise StoreError(f"invalid stage name {stage!r}")
        if not _KEY_RE.match(key):
            raise StoreError(f"invalid artifact key {key!r} (expected 64 hex digits)")
        return f"{self.root}/{stage}/{key}"

    def files_dir(self, stage: str, key: str, manifest: dict[str, Any]) -> str:
        """Where an artifact's files live (object stores: the writer prefix its manifest names)."""
        return store_remote.files_dir(self._dir(stage, key), manifest)

    def uri(self, stage: str, key: str) -> str:
        path = self._dir(stage, key)
        return path if self.local else self.fs.unstrip_protocol(path)

    def work_dir(self, stage: str, key: str) -> Path:
        """Deterministic per-key scratch dir (checkpoints): a retry finds what a crash left."""
        self._dir(stage, key)
        return self.scratch / "work" / stage / key

    @contextmanager
    def lock(self, stage: str, key: str, timeout: float = -1) -> Iterator[None]:
        """Serialise work on one key (same host or shared local filesystem)."""
        self._dir(stage, key)
        path = self.scratch / "locks" / f"{stage}-{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path), timeout=timeout):
            yield

    # ---- lookup ------------------------------------------------------------------------
    def read_manifest(self, stage: str, key: str) -> dict[str, Any] | None:
        """The manifest of (stage, key), or None when there is no artifact.

        Raises `CorruptArtifact` when the artifact directory exists but its manifest is
        unreadable, names another artifact, or (local stores, where a directory only ever
        appears whole by a rename) is missing: such a directory must not look absent, or a
        rebuild could never publish over it. Raises `SymlinkedArtifact` for a symlink.
        """
        where = self._dir(stage, key)
        self._refuse_symlink(stage, key)
        try:
            with self.fs.open(f"{where}/{MANIFEST}", "rb") as f:
                manifest = json.loads(f.read())
        except FileNotFoundError:
            if self.local and os.path.isdir(where):
                raise CorruptArtifact(f"{MANIFEST}: missing") from None
            return None
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
            raise CorruptArtifact(f"{MANIFEST}: unreadable ({exc})") from None
        if not isinstance(manifest, dict):
            raise CorruptArtifact(f"{MANIFEST}: not a JSON object")
        if manifest.get("key") != key or manifest.get("stage") != stage:
            raise CorruptArtifact(f"{MANIFEST}: names another artifact")
        if not isinstance(manifest.get("files"), list):
            raise CorruptArtifact(f"{MANIFEST}: no file list")
        return manifest

    def _refuse_symlink(self, stage: str, key: str) -> None:
        """The store refuses symlinked stage or artifact directories (see README "Reliability"):
        gc, verify and quarantine work on the store's own directories, and a link could make
        them act on (or miss) files elsewhere."""
        if not self.local:
            return
        for path in (f"{self.root}/{stage}", f"{self.root}/{stage}/{key}"):
            if os.path.islink(path):
                raise SymlinkedArtifact(
                    f"{path} is a symlink (to {os.readlink(path)}); the store refuses symlinked "
                    "artifacts: replace it with a copy or remove it"
                )

    def lookup(self, stage: str, key: str) -> ArtifactRef | None:
        """The ref of a *complete* artifact (manifest + every listed file at its size), or None."""
        try:
            manifest = self.read_manifest(stage, key)
        except CorruptArtifact:
            return None
        if manifest is None:
            return None
        base = self.files_dir(stage, key, manifest)
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return None
        sizes = {p[len(base) + 1 :]: info.get("size") for p, info in found.items()}
        for entry in manifest.get("files", []):
            if sizes.get(entry["path"]) != entry["size"]:
                return None
        return self._ref(manifest, reused=True)

    def _ref(self, manifest: dict[str, Any], reused: bool) -> ArtifactRef:
        stage, key = manifest["stage"], manifest["key"]
        return ArtifactRef(
            stage=stage,
            key=key,
            uri=self.uri(stage, key),
            metrics=manifest.get("metrics", {}),
            reused=reused,
        )

    def manifests(self) -> list[dict[str, Any]]:
        """Every readable manifest in the store (for `fasttrack ls`; see `scan` for the rest)."""
        return self.scan()[0]

    def scan(self) -> tuple[list[dict[str, Any]], list[Broken]]:
        """(readable manifests, broken artifact directories): a corrupt manifest or a symlink
        is listed, never skipped, so verify, ls and gc see it."""
        good: list[dict[str, Any]] = []
        broken: list[Broken] = []
        for stage, key in self._artifact_dirs():
            try:
                manifest = self.read_manifest(stage, key)
            except StoreError as exc:
                broken.append(Broken(stage, key, str(exc), isinstance(exc, SymlinkedArtifact)))
                continue
            if manifest is not None:
                good.append(manifest)
        return good, broken

    def _artifact_dirs(self) -> list[tuple[str, str]]:
        if not self.local:  # object stores: a key "directory" exists once it has a manifest
            paths = self.fs.glob(f"{self.root}/*/*/{MANIFEST}")
            pairs = [tuple(p.split("/")[-3:-1]) for p in paths]
        elif os.path.isdir(self.root):  # os.scandir lists symlinks too (fsspec's glob skips them)
            pairs = []
            with os.scandir(self.root) as top:
                for entry in top:
                    if entry.is_dir() and entry.name not in _RESERVED:
                        pairs += [(entry.name, k) for k in os.listdir(entry.path)]
        else:
            return []
        ok = [(s, k) for s, k in pairs if _STAGE_RE.match(s) and _KEY_RE.match(k)]
        return sorted((s, k) for s, k in ok if s not in _RESERVED)

    def verify(self, stage: str, key: str) -> list[str]:
        """Problems found by re-hashing every file of an artifact (empty list = intact)."""
        try:
            manifest = self.read_manifest(stage, key)
        except StoreError as exc:
            return [str(exc)]
        if manifest is None:
            return [f"{stage}/{key}: no artifact"]
        problems, base = [], self.files_dir(stage, key, manifest)
        for entry in manifest["files"]:
            try:
                with self.fs.open(f"{base}/{entry['path']}", "rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
            except FileNotFoundError:
                problems.append(f"{entry['path']}: missing")
                continue
            if digest != entry["sha256"]:
                problems.append(f"{entry['path']}: sha256 mismatch")
        return problems

    # ---- publish -----------------------------------------------------------------------
    @contextmanager
    def staging(self, stage: str, key: str) -> Iterator[Path]:
        """A fresh local dir to build an artifact in; removed afterwards unless published."""
        self._dir(stage, key)
        name = f"{socket.gethostname()}--{os.getpid()}--{stage}-{key[:12]}-{uuid.uuid4().hex[:8]}"
        path = self.scratch / "tmp" / name
        path.mkdir(parents=True)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def publish(
        self,
        stage: str,
        key: str,
        src: Path,
        *,
        replace: bool = False,
        **fields: Any,
    ) -> ArtifactRef:
        """Publish the files in `src` as artifact (stage, key); manifest written last.

        `fields` go into the manifest (config, upstream, inputs, metrics, timings, device...).
        If another process published the key first, its artifact wins and ours is discarded.
        """
        final = self._dir(stage, key)
        files = [
            {
                "path": p.relative_to(src).as_posix(),
                "size": p.stat().st_size,
                "sha256": sha256_file(p),
            }
            for p in sorted(src.rglob("*"))
            if p.is_file() and p.name != MANIFEST
        ]
        manifest = {
            "format": 1,
            "key": key,
            "stage": stage,
            **fields,
            "versions": library_versions(),
            "host": socket.gethostname(),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "files": files,
        }
        if not replace and (existing := self.lookup(stage, key)) is not None:
            return existing
        if self.local:
            ours = self._publish_local(src, final, manifest, replace)
        else:
            ours = store_remote.publish(self, src, final, manifest, replace)
        published = self.lookup(stage, key)
        if published is None:  # pragma: no cover - would mean the filesystem lied to us
            raise StoreError(f"{stage}/{key}: publish did not produce a complete artifact")
        return published.model_copy(update={"reused": not ours})

    def _publish_local(self, src: Path, final: str, manifest: dict, replace: bool) -> bool:
        tmp = self.scratch / "tmp" / f"pub-{uuid.uuid4().hex}"
        try:
            shutil.copytree(src, tmp) if src.parent != tmp.parent else src.rename(tmp)
            with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=2, sort_keys=True, default=str)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:  # e.g. disk full: leave no litter behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        Path(final).parent.mkdir(parents=True, exist_ok=True)
        trash = None
        if replace and os.path.exists(final):
            trash = self.scratch / "tmp" / f"trash-{uuid.uuid4().hex}"
            os.rename(final, trash)
        try:
            os.rename(tmp, final)
            ours = True
        except OSError:  # another process published the same key first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
            ours = False
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return ours

    # ---- fetch -------------------------------------------------------------------------
    def local_path(self, ref: ArtifactRef) -> Path:
        """A local directory holding the artifact's files (downloaded and verified if remote)."""
        if self.local:
            return Path(self._dir(ref.stage, ref.key))
        return store_remote.fetch(self, ref)

    def clean_tmp(self, min_age_s: float = 60.0) -> int:
        """Remove staging litter of dead processes on this host; returns the number removed."""
        tmp, host, removed = self.scratch / "tmp", socket.gethostname(), 0
        if not tmp.is_dir():
            return 0
        for entry in tmp.iterdir():
            parts = entry.name.split("--")
            ours = len(parts) == 3 and parts[0] == host and parts[1].isdigit()
            try:
                stale = time.time() - entry.stat().st_mtime > min_age_s
            except FileNotFoundError:  # published or removed by its owner since iterdir()
                continue
            dead = ours and not _pid_alive(int(parts[1]))
            if dead or (not ours and stale):
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        return removed
