"""Training in a killable child: a killed child is retried by Prefect and resumes from its last
checkpoint to (nearly) the same model as an uninterrupted run; a timeout stops the child."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from fasttrack.core.config_loader import load_config
from fasttrack.core.store import ArtifactStore
from fasttrack.lib.training import checkpoint_complete
from tests.conftest import tiny_config_dict, training_children, write_config

pytestmark = pytest.mark.e2e


def resume_config(tmp_path: Path, store: str, **pretrain) -> Path:
    d = tiny_config_dict(tmp_path / store)
    d["model"]["architecture"] |= {"hidden_size": 64, "intermediate_size": 128}
    d["pretrain"] |= {"max_steps": 60, "save_steps": 10, "eval_steps": 60, **pretrain}
    return write_config(tmp_path / f"{store}.yaml", d)


def run_pretrain(cfg_path: Path) -> dict:
    from flows.pipeline import PipelineParams, pipeline

    summary = pipeline(PipelineParams(config=str(cfg_path), stages=["pretrain"]))
    return next(s for s in summary.steps if s.step == "pretrain").metrics


def test_killed_training_child_is_retried_and_resumes(tmp_path, prefect_harness):
    killed_cfg = resume_config(tmp_path, "killed")
    store = ArtifactStore(load_config(killed_cfg).store)
    work = store.scratch / "work" / "pretrain"
    kills: list[int] = []

    def kill_after_first_checkpoint() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if any(checkpoint_complete(p) for p in work.glob("*/checkpoint-*")):
                for child in training_children():
                    kills.append(child.pid)
                    os.killpg(child.pid, signal.SIGKILL)  # the child and its process group
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    resumed = run_pretrain(killed_cfg)  # Prefect retries the task after the crash
    killer.join()
    assert kills, "the training child was never seen"
    assert resumed["resumed_from_step"] >= 10 and resumed["steps"] == 60
    assert [m["stage"] for m in store.manifests()].count("pretrain") == 1

    straight = run_pretrain(resume_config(tmp_path, "straight"))
    assert straight["resumed_from_step"] == 0
    assert resumed["eval_loss"] == pytest.approx(straight["eval_loss"], rel=0.02)
    assert resumed["last_logged_loss"] == pytest.approx(straight["last_logged_loss"], rel=0.02)


def test_stage_timeout_stops_the_training_child(tmp_path, prefect_harness):
    from flows.pipeline import PipelineParams, pipeline

    cfg_path = resume_config(tmp_path, "slow", max_steps=100_000, timeout_minutes=0.25)
    store = ArtifactStore(load_config(cfg_path).store)
    seen: set[psutil.Process] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.update(training_children())
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()
    state = pipeline(PipelineParams(config=str(cfg_path), stages=["pretrain"]), return_state=True)
    stop.set()
    assert state.is_failed()
    with pytest.raises(Exception, match=r"pretrain: stopped after the timeout of 0\.25 min"):
        state.result()
    assert seen, "the training child was never seen"
    gone, alive = psutil.wait_procs(seen, timeout=10)
    assert not alive
    assert not [m for m in store.manifests() if m["stage"] == "pretrain"]
