"""File-system faults for real, not simulated: the CLI runs in a private mount namespace
(`unshare --mount`, as root) over a read-only bind mount of the store, or over a copy of the
store on a tmpfs with a few KB left. Each must end in one `error:` line (exit 2) with nothing
published and no torn checkpoint left, while reading a read-only store keeps working."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fasttrack.core.config_loader import load_config
from fasttrack.core.store import ArtifactStore
from flows.pipeline import PipelineParams, pipeline
from tests.e2e.bad_inputs import FS_CASES
from tests.e2e.storecheck import ROOT, assert_consistent, cli_env, fault_config, snapshot

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_harness")]
DISK_FULL, READ_ONLY = FS_CASES


def _namespaces() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = ["unshare", "--mount", "sh", "-c", "mount -t tmpfs -o size=1M probe /mnt"]
    return subprocess.run(probe, capture_output=True).returncode == 0


needs_mounts = pytest.mark.skipif(
    not _namespaces(), reason="needs root and mount namespaces (unshare --mount)"
)


def _cli(setup: str, args: list[str], env: dict[str, str], after: str = "") -> tuple[int, str]:
    """`fasttrack ARGS` after `setup` (mounts) in a private mount namespace; `after` runs there
    once the CLI has exited (e.g. to copy what a tmpfs holds out of the namespace)."""
    cli = shlex.join([sys.executable, "-m", "flows.cli", *args])
    script = f"set -e; {setup}; set +e; {cli}; rc=$?; {after or 'true'}; exit $rc"
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    return proc.returncode, proc.stdout + proc.stderr


def _one_error(output: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in output, output[-3000:]
    return errors[0].removeprefix("error: ")


@needs_mounts
def test_read_only_store_reads_work_builds_fail_cleanly(tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL

    cfg_path = fault_config(tmp_path)
    cfg = str(cfg_path)
    store = ArtifactStore(load_config(cfg_path).store)
    pipeline(PipelineParams(config=cfg, stages=["data", "pretrain", "rag"]))
    before = snapshot(store)
    env = cli_env(tmp_path / "ph", PREFECT_API_URL.value())
    q = shlex.quote(store.root)
    ro = f"mount --bind {q} {q}; mount -o remount,ro,bind {q}"

    rc, out = _cli(ro, ["run", cfg, "--stages", "data,pretrain,rag"], env)
    assert rc == 0 and "0 step(s) executed" in out, out[-3000:]
    rc, out = _cli(ro, ["ls", "--store", store.root], env)
    assert rc == 0 and out.count("pretrain") >= 1 and "CORRUPT" not in out, out[-3000:]
    rc, out = _cli(ro, ["verify", "--store", store.root], env)
    assert rc == 0 and f"verified {len(before)} artifact(s)" in out, out[-3000:]
    rc, out = _cli(ro, ["ask", cfg, "How to use lists?"], env)
    assert rc == 0 and "pretrain (" in out and "note: not using sft" in out, out[-3000:]

    rc, out = _cli(ro, ["run", cfg, "--stages", "data,pretrain,sft"], env)
    message = _one_error(out)
    assert rc == 2 and READ_ONLY.pattern("sft").fullmatch(message), message
    assert store.root in message and "Read-only file system" in message
    assert snapshot(store) == before  # nothing published, nothing moved


def _store_size(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


@needs_mounts
def test_disk_full_while_a_checkpoint_is_written(tmp_path: Path) -> None:
    """The store's disk fills up while pretraining writes its first checkpoint."""
    from prefect.settings import PREFECT_API_URL

    cfg_path = fault_config(tmp_path)
    store = ArtifactStore(load_config(cfg_path).store)
    pipeline(PipelineParams(config=str(cfg_path), stages=["data", "pretrain"],
                            overrides=["pretrain.max_steps=1"]))  # fmt: skip
    [tiny] = [m for m in store.manifests() if m["stage"] == "pretrain"]
    weights = next(f["size"] for f in tiny["files"] if f["path"] == "model.safetensors")
    env = cli_env(tmp_path / "ph", PREFECT_API_URL.value())
    mnt, after = tmp_path / "disk", tmp_path / "after"
    mnt.mkdir()
    after.mkdir()
    # A tmpfs holding a copy of the store with room for the locks and stamps of the run but
    # not for a checkpoint (weights + twice their size of optimizer state).
    room = _store_size(Path(store.root)) + 32 * 4096 + weights // 2
    m, r = shlex.quote(str(mnt)), shlex.quote(store.root)
    setup = (f"mount -t tmpfs -o size=64M fasttrack-full {m}; cp -a {r}/. {m}/; "
             f"mount -o remount,size={room} {m}; mount --bind {m} {r}")  # fmt: skip
    rc, out = _cli(setup, ["run", str(cfg_path), "--stages", "data,pretrain"], env,
                   after=f"cp -a {r}/. {shlex.quote(str(after))}/")  # fmt: skip
    message = _one_error(out)
    assert rc == 2 and DISK_FULL.pattern("pretrain").fullmatch(message), message
    assert "/work/pretrain/" in message  # names the checkpoint being written
    full = ArtifactStore(after)
    assert [m["key"] for m in full.manifests() if m["stage"] == "pretrain"] == [tiny["key"]]
    assert not list((after / "work").glob("pretrain/*/checkpoint-*"))  # the torn one is gone
    assert not list((after / "tmp").iterdir())  # no staging litter
    assert_consistent(full)
