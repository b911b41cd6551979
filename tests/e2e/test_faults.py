"""Faults: SIGKILL during every stage, a builder that raises half-way, a full disk, corrupt bytes.

After each: the store holds only complete artifacts (every manifest verifies), nothing was
published twice, and a re-run finishes correctly.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fasttrack.core import faultpoint
from fasttrack.core.config_loader import load_config
from fasttrack.core.store import ArtifactStore
from fasttrack.lib.training import checkpoint_complete
from flows.cli import app
from flows.pipeline import PipelineParams, pipeline
from tests.conftest import disk_full_on_publish
from tests.e2e.storecheck import (
    assert_consistent,
    assert_not_republished,
    cli_env,
    fault_config,
    snapshot,
    spawn,
)

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_harness")]
TRAINING = ("data", "pretrain", "sft", "dpo")
ALL = "data,pretrain,sft,dpo,rag,evaluate"
FINAL_COUNTS = {"data": 1, "base": 1, "pack": 1, "pretrain": 1, "sft": 1, "dpo_ref": 1, "dpo": 1,
                "rag": 1, "evaluate": 5, "report": 1}  # fmt: skip


def _staging(store: ArtifactStore, stage: str) -> Callable[[], bool]:
    return lambda: any((store.scratch / "tmp").glob(f"*--{stage}-*"))


def _checkpoint(store: ArtifactStore, stage: str) -> Callable[[], bool]:
    work = store.scratch / "work" / stage
    return lambda: any(checkpoint_complete(p) for p in work.glob("*/checkpoint-*"))


def _inside(tmp: Path, point: str) -> tuple[dict[str, str], Callable[[], bool]]:
    """Env that stops the run at a named point inside a stage (tasks/faultpoint.py), and the
    readiness check for it: the kill lands there, not at start-up, however loaded the machine."""
    env = {faultpoint.ENV: point, faultpoint.DIR_ENV: str(tmp)}
    return env, faultpoint.marker(tmp, point).exists


def _kill_when(proc, ready: Callable[[], bool], what: str, log: Path) -> None:
    deadline = time.time() + 600  # a safety net, not a timing: a loaded machine is slow
    try:
        while not ready():
            assert proc.poll() is None, f"{what}: the run ended first:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"{what}: not reached in time"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_sigkill_during_each_stage_then_rerun(tmp_path: Path) -> None:
    """One run per kill, each continuing the pipeline where the previous one was killed."""
    from prefect.settings import PREFECT_API_URL

    cfg_path = fault_config(tmp_path)
    store = ArtifactStore(load_config(cfg_path).store)
    env = cli_env(tmp_path / "ph", PREFECT_API_URL.value())  # the harness API: no server start
    kills = [
        ("data", TRAINING, _staging(store, "data")),
        ("pretrain", TRAINING, _checkpoint(store, "pretrain")),
        ("sft", TRAINING, _checkpoint(store, "sft")),
        ("dpo", TRAINING, _checkpoint(store, "dpo")),
        ("rag", ALL.split(","), _inside(tmp_path, "rag:index-written")),
        ("evaluate", ALL.split(","), _inside(tmp_path, "evaluate:samples-written")),
    ]
    before: dict = {}
    for stage, stages, ready in kills:
        hook, ready = ready if isinstance(ready, tuple) else ({}, ready)
        log = tmp_path / f"kill-{stage}.log"
        proc = spawn(["run", str(cfg_path), "--stages", ",".join(stages)], env | hook, log)
        _kill_when(proc, ready, stage, log)
        published = Counter(m["stage"] for m in store.manifests())
        killed_stage = "report" if stage == "evaluate" else stage
        assert published[killed_stage] == 0, f"{stage} finished before the kill"
        if hook:  # killed half-way through the build: its staging dir holds some files
            assert any((store.scratch / "tmp").glob(f"*--{stage}-*/*")), stage
        assert_consistent(store)
        after = snapshot(store)
        assert_not_republished(before, after)
        before = after
    log = tmp_path / "final.log"
    final = spawn(["run", str(cfg_path), "--stages", ALL], env, log)
    assert final.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert_consistent(store)
    assert_not_republished(before, snapshot(store))
    assert Counter(m["stage"] for m in store.manifests()) == FINAL_COUNTS
    trained = {m["stage"]: m["metrics"] for m in store.manifests() if m["stage"] in TRAINING}
    for stage in ("pretrain", "sft", "dpo"):  # killed after a checkpoint: resumed, not restarted
        assert trained[stage]["resumed_from_step"] > 0, (stage, trained[stage])
    assert not list((store.scratch / "tmp").iterdir())  # the killed runs' litter was cleaned
    assert not list((store.scratch / "work").glob("*/*/checkpoint-*"))


def _data_params(cfg_path: Path) -> PipelineParams:
    return PipelineParams(config=str(cfg_path), stages=["data"])


def test_builder_raising_half_way_publishes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fasttrack.lib import dataprep

    cfg_path = fault_config(tmp_path)
    store = ArtifactStore(load_config(cfg_path).store)
    real, written = dataprep.pq.ParquetWriter, []

    class HalfThenFail(real):  # the split files are written as streams
        def __init__(self, where, *a, **k):
            if Path(where).stem in ("train", "validation", "test"):
                if len(written) >= 4:  # 4 of the 9 split files are on disk
                    raise RuntimeError("builder crashed half-way")
                written.append(where)
            super().__init__(where, *a, **k)

    monkeypatch.setattr(dataprep.pq, "ParquetWriter", HalfThenFail)
    with pytest.raises(RuntimeError, match="half-way"):
        pipeline(_data_params(cfg_path))
    assert len(written) == 4 and store.manifests() == []
    assert not (Path(store.root) / "data").exists()
    assert list((store.scratch / "tmp").iterdir()) == []  # staging removed
    monkeypatch.setattr(dataprep.pq, "ParquetWriter", real)
    summary = pipeline(_data_params(cfg_path))
    assert summary.executed == ["data"]
    assert_consistent(store)


def test_disk_full_while_publishing(tmp_path: Path) -> None:
    """ENOSPC when the manifest is flushed: one error line, exit 2, nothing published."""
    cfg_path = fault_config(tmp_path)
    store = ArtifactStore(load_config(cfg_path).store)
    with disk_full_on_publish():
        result = CliRunner().invoke(app, ["run", str(cfg_path), "--stages", "data"])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert "no space left on device" in errors[0] and "nothing was published" in errors[0]
    assert "Traceback" not in result.output
    assert store.manifests() == [] and list((store.scratch / "tmp").iterdir()) == []
    assert pipeline(_data_params(cfg_path)).executed == ["data"]
    assert_consistent(store)


def test_corrupt_artifact_is_quarantined_and_recomputed(tmp_path: Path) -> None:
    cfg_path = fault_config(tmp_path)
    store = ArtifactStore(load_config(cfg_path).store)
    params = PipelineParams(config=str(cfg_path), stages=["pretrain"])
    first = pipeline(params)
    pre = next(s for s in first.steps if s.step == "pretrain")
    weights = Path(store.uri("pretrain", pre.key)) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the weights, size unchanged
    weights.write_bytes(data)
    before = snapshot(store)
    second = pipeline(params)
    status = {s.step: s.status for s in second.steps}
    assert status == {"data": "cached", "base": "cached", "pack": "cached", "pretrain": "executed"}
    [note] = (Path(store.root) / "quarantine" / "pretrain").glob(f"{pre.key}-*.json")
    assert json.loads(note.read_text())["problems"] == ["model.safetensors: sha256 mismatch"]
    assert (Path(str(note).removesuffix(".json")) / "model.safetensors").read_bytes() == data
    assert_consistent(store)
    after = snapshot(store)
    assert_not_republished({k: v for k, v in before.items() if k[0] != "pretrain"}, after)
    assert after[("pretrain", pre.key)] != before[("pretrain", pre.key)]  # rebuilt once
    third = pipeline(params)
    assert third.executed == []  # the rebuilt artifact is reused (Prefect: Cached)
