"""Object stores (S3, MinIO, GCS...) behind `ArtifactStore`: credentials, publish, fetch.

Why a prefix per writer: object stores have no rename, so two writers of one key uploading into
one prefix would interleave their files. Each writer uploads under its own
`<stage>/<key>/objects/<writer>/`, and the artifact appears only when `manifest.json`, which names
that prefix, is created. The first manifest wins through a conditional create (s3fs
`mode="create"` = `If-None-Match: *`, honoured by AWS S3, MinIO and moto); a loser deletes its
own prefix, so a published artifact can never hold a loser's file.

Remaining race, where the server ignores the condition (or fsspec emulates it as
exists-then-write): two writers finishing in the same instant can both write the manifest. The
last write stays, still naming only its own files; the other writer sees that on re-reading and
deletes its prefix, so a reader that fetched the overwritten manifest in between gets a clear
missing-file error, never mixed files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import uuid
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fsspec.registry import known_implementations
from fsspec.utils import get_protocol

from fasttrack.core.errors import StoreError
from fasttrack.core.files import MANIFEST, sha256_file

if TYPE_CHECKING:
    from fasttrack.core.store import ArtifactRef, ArtifactStore

OBJECTS = "objects"
_OBJECTS_RE = re.compile(r"^objects/[A-Za-z0-9._-]{1,128}$")
# s3fs/gcsfs cache listings for the life of the process: a worker would never see an artifact
# another worker published after its first look.
_LISTING_CACHED = {"s3", "s3a", "gs", "gcs"}
_BLOCK_RE = re.compile(r"^[a-z0-9-]+/[A-Za-z0-9_.-]+$")


# ---- where and how to connect -------------------------------------------------------------
def check_url(url: str) -> str:
    """Refuse a URL whose fsspec backend is unknown or not installed (config-time check)."""
    if not url.strip():
        raise ValueError("empty store URL")
    protocol = get_protocol(url)
    if protocol in ("file", "local"):
        return url
    impl = known_implementations.get(protocol)
    if impl is None:
        raise ValueError(f"unknown fsspec protocol {protocol}:// in {url!r}")
    if find_spec(impl["class"].split(".")[0]) is None:
        raise ValueError(f"{protocol}:// needs a package that is not installed: {impl['err']}")
    if not url.split("://", 1)[1].strip("/"):
        raise ValueError(f"{url!r} names no bucket")
    return url


def resolve(target: Any) -> tuple[str, dict[str, Any]]:
    """URL and fsspec storage options of a store given as a path, URL or `StoreConfig`.

    Credentials come from the Prefect block named in the config, else from the environment
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS).
    """
    url = str(getattr(target, "url", target))
    block = getattr(target, "credentials_block", None)
    options = block_options(block) if block else {}
    if get_protocol(url) in _LISTING_CACHED:
        options.setdefault("use_listings_cache", False)
    return url, options


def block_options(slug: str) -> dict[str, Any]:
    """fsspec storage options from a Prefect block `<type-slug>/<name>`.

    `aws-credentials/NAME`, `minio-credentials/NAME` (prefect-aws), or `secret/NAME` whose value
    is a JSON object of storage options (any backend: `{"token": ...}` for gcsfs, and so on).
    """
    from prefect.blocks.core import Block
    from prefect.blocks.system import Secret

    if not _BLOCK_RE.match(slug):
        raise StoreError(f"store.credentials_block {slug!r}: expected <block-type-slug>/<name>")
    try:
        block = Block.load(slug, _sync=True)  # a block, never a coroutine, in any context
    except (ValueError, KeyError, ImportError) as exc:
        raise StoreError(f"store.credentials_block {slug!r}: cannot load it ({exc})") from None
    if isinstance(block, Secret):
        value = block.get()
        if not isinstance(value, dict):
            raise StoreError(f"secret {slug!r}: value must be a JSON object of storage options")
        return dict(value)
    if hasattr(block, "aws_client_parameters"):
        return _aws_options(slug, block)
    raise StoreError(
        f"store.credentials_block {slug!r}: unsupported block type {block._block_type_slug}"
    )


def _aws_options(slug: str, block: Any) -> dict[str, Any]:
    """s3fs options from prefect-aws AwsCredentials / MinIOCredentials."""
    if getattr(block, "assume_role_arn", None):
        raise StoreError(f"{slug}: assume_role_arn is not supported for the store; use a profile")
    secret = getattr(block, "aws_secret_access_key", None) or getattr(
        block, "minio_root_password", None
    )
    options = {
        "key": getattr(block, "aws_access_key_id", None) or getattr(block, "minio_root_user", None),
        "secret": secret.get_secret_value() if secret is not None else None,
        "token": getattr(block, "aws_session_token", None),
        "profile": getattr(block, "profile_name", None),
    }
    client = block.aws_client_parameters.get_params_override()
    config = client.pop("config", None)
    if block.region_name:
        client["region_name"] = block.region_name
    options = {k: v for k, v in options.items() if v is not None}
    if client:
        options["client_kwargs"] = {
            k: str(v) if isinstance(v, Path) else v for k, v in client.items()
        }
    if config is not None:
        options["config_kwargs"] = block.aws_client_parameters.config
    return options


# ---- publish ------------------------------------------------------------------------------
def writer_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def files_dir(base: str, manifest: dict[str, Any]) -> str:
    """Where the files of the artifact at `base` live: the prefix its manifest names, or `base`."""
    objects = manifest.get(OBJECTS)
    if objects is None:
        return base  # local stores, and remote artifacts published before writer prefixes
    if not isinstance(objects, str) or not _OBJECTS_RE.match(objects):
        raise StoreError(f"{base}/{MANIFEST}: invalid objects prefix {objects!r}")
    return f"{base}/{objects}"


def upload(fs: Any, src: Path, prefix: str, paths: list[str]) -> None:
    """Upload the files (relative paths under `src`) below `prefix`, concurrently where the
    backend can (s3fs batches them)."""
    if paths:
        fs.put([str(src / p) for p in paths], [f"{prefix}/{p}" for p in paths])


def create_manifest(fs: Any, path: str, payload: bytes) -> bool:
    """Create `path` only if it does not exist yet; False when another writer's is there."""
    try:
        fs.pipe_file(path, payload, mode="create")
    except FileExistsError:
        return False
    return True


def publish(store: ArtifactStore, src: Path, final: str, manifest: dict, replace: bool) -> bool:
    """Upload under a fresh writer prefix, then create the manifest; True if ours won."""
    fs, objects = store.fs, f"{OBJECTS}/{writer_id()}"
    manifest = {**manifest, OBJECTS: objects}
    upload(fs, src, f"{final}/{objects}", [e["path"] for e in manifest["files"]])
    payload = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
    path = f"{final}/{MANIFEST}"
    old = store.read_manifest(manifest["stage"], manifest["key"]) if replace else None
    if replace:
        fs.pipe_file(path, payload)
    elif not create_manifest(fs, path, payload):
        _remove(fs, f"{final}/{objects}")
        return False
    current = store.read_manifest(manifest["stage"], manifest["key"]) or {}
    if current.get(OBJECTS) != objects:  # overwritten in the same instant (see module doc)
        _remove(fs, f"{final}/{objects}")
        return False
    if old is not None and old.get(OBJECTS) != objects:  # forced: the replaced files go
        old_dir = files_dir(final, old)
        _remove(fs, *(f"{old_dir}/{e['path']}" for e in old.get("files", [])))
    return True


def _remove(fs: Any, *paths: str) -> None:
    for path in paths:
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            continue


# ---- fetch --------------------------------------------------------------------------------
def fetch(store: ArtifactStore, ref: ArtifactRef) -> Path:
    """Download an artifact into the local cache (sha256-verified), once per published version.

    The cached copy is reused only while the store's manifest is the one it was fetched with, so
    a forced rebuild on another worker is never answered with stale local files.
    """

    manifest = store.read_manifest(ref.stage, ref.key)
    if manifest is None:
        raise StoreError(f"{ref.stage}/{ref.key}: artifact not found in {store.url}")
    dest = store.cache / "artifacts" / ref.stage / ref.key
    if _same_version(dest / MANIFEST, manifest):
        return dest
    store.cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"fetch-{ref.key[:12]}-", dir=store.cache))
    base = files_dir(store._dir(ref.stage, ref.key), manifest)
    paths = [e["path"] for e in manifest["files"]]
    for p in paths:
        (tmp / p).parent.mkdir(parents=True, exist_ok=True)
    if paths:
        store.fs.get([f"{base}/{p}" for p in paths], [str(tmp / p) for p in paths])
    for entry in manifest["files"]:
        if sha256_file(tmp / entry["path"]) != entry["sha256"]:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StoreError(f"{ref.stage}/{ref.key}/{entry['path']}: sha256 mismatch")
    (tmp / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    dest.parent.mkdir(parents=True, exist_ok=True)
    stale = dest.with_name(f"{dest.name}.stale-{uuid.uuid4().hex[:8]}")
    if dest.exists():
        os.rename(dest, stale)  # an older version; moved aside atomically, then removed
    try:
        tmp.rename(dest)
    except OSError:  # another process of this host fetched it at the same time
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(stale, ignore_errors=True)
    return dest


def _same_version(cached: Path, manifest: dict[str, Any]) -> bool:
    try:
        mine = json.loads(cached.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return all(mine.get(k) == manifest.get(k) for k in ("created_at", "host", OBJECTS, "files"))
