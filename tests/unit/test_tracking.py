"""Tracking config and the tracker's behaviour when off or down (no server needed here; the
real MLflow server and TensorBoard read-back are in tests/e2e/test_tracking_sweep.py)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import pytest

import tasks  # noqa: F401  (fills the stage registry)
from fasttrack.core.config_loader import load_config
from fasttrack.core.errors import ConfigError
from fasttrack.core.stage import stage_spec
from fasttrack.core.store import ArtifactRef
from fasttrack.lib.chain import walk
from fasttrack.lib.tracking import StepInfo, Tracker, curve_points, flatten
from tests.conftest import tiny_config_dict, write_config


def _step_keys(cfg) -> dict[str, str]:
    """Every step's key for a config, computed from the specs alone (nothing is built)."""
    keys: dict[str, str] = {}

    def step(name: str, *ups: ArtifactRef) -> ArtifactRef:
        spec = stage_spec(name)(cfg, *ups)
        keys[name] = spec.key
        return ArtifactRef(stage=spec.stage, key=spec.key, uri=f"/x/{spec.key}")

    data = step("data")
    models = walk(data, step)
    rag = step("rag", data)
    for name, ref in models.items():
        keys[f"evaluate:{name}"] = stage_spec("evaluate")(cfg, ref, data).key
    keys["evaluate:rag"] = stage_spec("evaluate")(cfg, models["sft"], data, rag).key
    return keys


def test_tracking_and_sweep_sections_are_in_no_stage_key(tmp_path: Path) -> None:
    plain = load_config(write_config(tmp_path / "a.yaml", tiny_config_dict(tmp_path / "s")))
    tracked = tiny_config_dict(
        tmp_path / "s",
        tracking={"mlflow": {"uri": "http://127.0.0.1:1", "experiment": "e"},
                  "tensorboard": {"dir": str(tmp_path / "tb")}},
        sweep={"params": {"dpo.beta": [0.1, 0.2]}, "metric": "pref_accuracy", "max_parallel": 2},
    )  # fmt: skip
    other = load_config(write_config(tmp_path / "b.yaml", tracked))
    assert other.tracking.mlflow and other.sweep.max_parallel == 2
    keys = _step_keys(plain)
    assert len(keys) >= 11 and keys == _step_keys(other)
    # ...while a real change (the swept field) does change the late keys, not the early ones
    beta = load_config(tmp_path / "a.yaml", ["dpo.beta=0.2"])
    changed = {k for k, v in _step_keys(beta).items() if keys[k] != v}
    assert changed == {"dpo", "evaluate:dpo"}


def test_tracking_config_errors_name_the_field(tmp_path: Path) -> None:
    bad = tiny_config_dict(tmp_path / "s", tracking={"mlflow": {"experiment": "x"}})
    with pytest.raises(ConfigError, match=r"tracking\.mlflow\.uri: Field required"):
        load_config(write_config(tmp_path / "c.yaml", bad))
    bad = tiny_config_dict(tmp_path / "s", tracking={"wandb": {}})
    with pytest.raises(ConfigError, match=r"tracking\.wandb: unknown key"):
        load_config(write_config(tmp_path / "c.yaml", bad))


def _fake_ref(tmp_path: Path) -> ArtifactRef:
    return ArtifactRef(stage="sft", key="a" * 64, uri=str(tmp_path / "x"), metrics={"loss": 1.0})


def _down_tracker(tmp_path: Path, uri: str, caplog) -> tuple[Tracker, float]:
    cfg = load_config(
        write_config(tmp_path / "t.yaml", tiny_config_dict(tmp_path / "s")),
        [f"tracking.mlflow.uri={uri}", "tracking.mlflow.timeout_s=1"],
    )
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        tracker = Tracker(cfg)
        for step in ("data", "sft", "dpo"):
            tracker.step(StepInfo(step, _fake_ref(tmp_path), "executed", 1.0))
        tracker.table([{"model": "sft", "perplexity": 3.0}])
        tracker.register({"stage": "sft", "promoted": "a" * 64, "uri": "/x"})
        tracker.end(ok=True)
    return tracker, time.monotonic() - started


def test_unreachable_tracker_warns_once_and_costs_no_time(tmp_path: Path, caplog) -> None:
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tracker, seconds = _down_tracker(tmp_path, f"http://127.0.0.1:{port}", caplog)
    warnings = [r for r in caplog.records if "MLflow at" in r.getMessage()]
    assert len(warnings) == 1 and "the run goes on" in warnings[0].getMessage()
    assert not tracker.mlflow_on
    assert seconds < 10  # MLflow's own client retries a refused connection for minutes


def test_tracker_that_never_answers_is_given_up_after_its_timeout(tmp_path, caplog) -> None:
    """A server that accepts and then hangs (a stuck proxy): one probe, timeout_s, one warning."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])  # never answers
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        tracker, seconds = _down_tracker(tmp_path, uri, caplog)
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()
    assert len([r for r in caplog.records if "MLflow at" in r.getMessage()]) == 1
    assert not tracker.mlflow_on and seconds < 10


def test_curve_points_keep_every_logged_step() -> None:
    hist = [
        {"loss": 2.0, "learning_rate": 0.1, "epoch": 0.1, "step": 5},
        {"loss": 1.5, "grad_norm": 0.5, "step": 10},
        {"eval_loss": 1.7, "step": 10},
        {"train_runtime": 3.0, "step": 10, "note": "x", "flag": True},
    ]
    points = curve_points(hist)
    assert ("train/loss", 2.0, 5) in points and ("train/loss", 1.5, 10) in points
    assert ("eval/loss", 1.7, 10) in points
    assert all(name not in ("train/epoch", "train/flag", "train/note") for name, *_ in points)


def test_flatten_names_fields_like_set() -> None:
    flat = flatten({"lora": {"r": 8, "target_modules": ["q", "v"]}, "beta": 0.1})
    assert flat == {"lora.r": 8, "lora.target_modules": ["q", "v"], "beta": 0.1}
