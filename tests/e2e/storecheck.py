"""Helpers of the fault and concurrency tests: real CLI processes and store invariants."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fasttrack.core import store_remote
from fasttrack.core.store import ArtifactStore
from tests.conftest import tiny_config_dict, write_config

ROOT = Path(__file__).resolve().parents[2]
RESERVED = {"tmp", "work", "locks", "quarantine", "verified"}


def fault_config(tmp_path: Path) -> Path:
    """The tiny config with a 3-document RAG folder: indexing takes seconds, not half a minute."""
    docs = tmp_path / "docs"
    docs.mkdir(exist_ok=True)
    for i, topic in enumerate(("lists", "dicts", "files")):
        text = f"# Python {topic}\n\n" + f"How to use {topic} in Python, note {i}. " * 20
        (docs / f"{topic}.md").write_text(text)
    short = {  # fewer steps than the tiny default; checkpoints early so a kill can resume
        "pretrain": {"max_steps": 20, "save_steps": 10, "eval_steps": 20},
        "sft": {"max_steps": 10, "save_steps": 5, "eval_steps": 10},
        "dpo": {"max_steps": 8, "save_steps": 4, "eval_steps": 8},
    }
    d = tiny_config_dict(tmp_path / "store", rag={"documents": str(docs)}, **short)
    return write_config(tmp_path / "faults.yaml", d)


def cli_env(prefect_home: Path, api_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(prefect_home), "COLUMNS": "200"}
    return env | ({"PREFECT_API_URL": api_url} if api_url else {})


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """`python -m flows.cli ARGS` in its own process group (so a kill takes its children too)."""
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        cmd = [sys.executable, "-m", "flows.cli", *args]
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def snapshot(store: ArtifactStore) -> dict[tuple[str, str], tuple[str, int]]:
    """(stage, key) -> (created_at, manifest inode): a republished key would change it."""
    out = {}
    for m in store.manifests():
        path = Path(store.uri(m["stage"], m["key"])) / "manifest.json"
        out[(m["stage"], m["key"])] = (m["created_at"], path.stat().st_ino)
    return out


def assert_consistent(store: ArtifactStore) -> None:
    """Only complete artifacts: every artifact dir has a manifest and every file verifies."""
    root = Path(store.root)
    for stage_dir in (p for p in root.iterdir() if p.is_dir() and p.name not in RESERVED):
        for art in stage_dir.iterdir():
            assert (art / "manifest.json").is_file(), f"{art}: artifact dir without manifest"
            assert store.verify(stage_dir.name, art.name) == [], art


def assert_not_republished(before: dict, after: dict) -> None:
    """Everything published before is still there, untouched (nothing was published twice)."""
    changed = {k: (v, after.get(k)) for k, v in before.items() if after.get(k) != v}
    assert not changed, changed


def orphans(store: ArtifactStore, stage: str, key: str) -> list[str]:
    """Writer prefixes of a key that its manifest does not name (killed or losing writers):
    litter for garbage collection; a prefix still being uploaded looks the same, so collect only
    old ones."""
    base = store._dir(stage, key)
    manifest = store.read_manifest(stage, key) or {}
    try:
        prefixes = store.fs.ls(f"{base}/{store_remote.OBJECTS}", detail=False)
    except FileNotFoundError:
        return []
    keep = store_remote.files_dir(base, manifest) if manifest.get(store_remote.OBJECTS) else None
    return [p.rstrip("/") for p in prefixes if p.rstrip("/") != keep]


HEAVY = ("torch", "transformers", "trl", "peft", "sentence_transformers", "faiss")
_PROBE = """
import sys
watch = set(sys.argv.pop(1).split(","))
from flows.cli import app
try:
    app(sys.argv[1:])
finally:  # app() exits
    print("loaded:", ",".join(sorted(watch & set(sys.modules))))
"""


def cli_imports(
    args: list[str], env: dict[str, str], watch: tuple[str, ...] = HEAVY
) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run `fasttrack ARGS` in a fresh interpreter; (the process, which of `watch` it imported)."""
    cmd = [sys.executable, "-c", _PROBE, ",".join(watch), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("loaded:")), "loaded:")
    return proc, [m for m in line.removeprefix("loaded:").strip().split(",") if m]
