"""A 2-point sweep over dpo.beta, run concurrently and tracked to a REAL MLflow server (SQLite
backend, its own process group) and to TensorBoard; read back through `MlflowClient` and
TensorBoard's event reader. Then: the same config with the tracker down runs (all cached) with
one warning, and `fasttrack compare` names the swept field."""

from __future__ import annotations

import logging
import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fasttrack.core.compute import free_port
from fasttrack.core.store import ArtifactStore
from tests.conftest import tiny_config_dict, write_config
from tests.e2e.test_server import start, stop, wait_healthy

pytest.importorskip("mlflow", reason="needs the track extra (mlflow, tensorboard)")
pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_harness")]
SHARED = {"data", "base", "pack", "pretrain", "sft", "dpo_ref",
          "evaluate:base", "evaluate:pretrain", "evaluate:sft"}  # fmt: skip


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{home}/mlflow.db",
           "--default-artifact-root", str(home / "artifacts"), "--workers", "1"]  # fmt: skip
    proc = start(cmd, dict(os.environ), home / "server.log")
    uri = f"http://127.0.0.1:{port}"
    wait_healthy(proc, f"{uri}/health", home / "server.log", "the MLflow server")
    yield uri
    stop(proc)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, mlflow_uri: str, prefect_harness):
    from flows.sweep import SweepParams, sweep

    tmp = tmp_path_factory.mktemp("sweep")
    cfg = tiny_config_dict(
        tmp / "store",
        name="swp",
        rag={"enabled": False},
        pretrain={"max_steps": 10, "eval_steps": 10, "save_steps": 10},
        sft={"max_steps": 6, "eval_steps": 6, "save_steps": 6},
        dpo={"max_steps": 4, "eval_steps": 4, "save_steps": 4, "logging_steps": 1},
        evaluate={"gates": ["dpo.pref_accuracy >= 0"]},
        # timeout_s: this shared machine runs at load ~14, where /health can take >3 s
        tracking={"mlflow": {"uri": mlflow_uri, "experiment": "sweep-test", "timeout_s": 30},
                  "tensorboard": {"dir": str(tmp / "tb")}},
    )  # fmt: skip
    path = write_config(tmp / "swp.yaml", cfg)
    params = SweepParams(config=str(path), grid={"dpo.beta": [0.05, 0.2]}, max_parallel=2)
    return path, tmp, sweep(params)


def test_concurrent_points_build_each_shared_key_once(swept) -> None:
    path, tmp, summary = swept
    assert [r["delta"] for r in summary.rows] == [{"dpo.beta": 0.05}, {"dpo.beta": 0.2}]
    assert summary.executed_steps == summary.distinct_keys == len(SHARED) + 2 * 3
    shared = Counter(k for r in summary.rows for k in r["keys"] if k.split(":")[0] != "dpo")
    assert {k.rsplit(":", 1)[0] for k, n in shared.items() if n == 2} == SHARED
    assert len({r["metrics"]["pref_accuracy"] for r in summary.rows}) >= 1
    assert summary.metric == "pref_accuracy" and summary.best in {r["point"] for r in summary.rows}
    report = Path(summary.report)
    assert "dpo.beta" in report.read_text() and (report.parent / "dpo.beta.png").is_file()
    assert {r["dpo.beta"] for r in summary.table} == {0.05, 0.2}


def test_mlflow_has_parent_and_nested_runs_curves_and_registered_model(swept, mlflow_uri):
    from mlflow.tracking import MlflowClient

    _, _, summary = swept
    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name("sweep-test")
    runs = client.search_runs([exp.experiment_id], max_results=200)
    parents = {r.info.run_name: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert set(parents) == {r["point"] for r in summary.rows}
    for point in summary.rows:
        parent = parents[point["point"]]
        assert parent.info.status == "FINISHED"
        assert float(parent.data.params["dpo.beta"]) == point["delta"]["dpo.beta"]
        assert "dpo.pref_accuracy" in parent.data.metrics
        children = {r.data.tags["mlflow.runName"]: r for r in runs
                    if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}  # fmt: skip
        assert {"data", "pretrain", "sft", "dpo", "report"} <= set(children)
        dpo = children["dpo"]
        assert float(dpo.data.params["beta"]) == point["delta"]["dpo.beta"]
        assert dpo.data.tags["fasttrack.key"] in {k.split(":", 1)[1] for k in point["keys"]}
        assert dpo.data.tags["fasttrack.artifact"].startswith("file://")
        assert dpo.data.tags["fasttrack.status"] == "executed"
        assert "pref_accuracy" in dpo.data.metrics
        curve = client.get_metric_history(dpo.info.run_id, "train/loss")
        assert [m.step for m in curve] == [1, 2, 3, 4]  # every logging step
    # the shared SFT step ran in one point and was reused (cached) by the other
    sft_status = sorted(r.data.tags["fasttrack.status"] for r in runs
                        if r.data.tags.get("mlflow.runName") == "sft")  # fmt: skip
    assert sft_status == ["cached", "executed"]
    versions = client.search_model_versions("name LIKE 'swp-sweep%'")  # no OR in MLflow filters
    assert len(versions) == 2 and all(v.tags["fasttrack.stage"] == "dpo" for v in versions)


def test_tensorboard_event_files_per_stage(swept) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, tmp, summary = swept
    folder = tmp / "tb" / summary.rows[0]["point"]
    assert {"data", "pretrain", "sft", "dpo"} <= {p.name for p in folder.iterdir()}
    acc = EventAccumulator(str(folder / "pretrain"))
    acc.Reload()
    losses = acc.Scalars("train/loss")
    assert len(losses) == 2 and losses[0].step == 5  # logging_steps 5 of 10 steps
    assert "final/eval_loss" in acc.Tags()["scalars"]


def test_tracker_down_run_goes_on_with_one_warning(swept, caplog) -> None:
    from flows.pipeline import PipelineParams, pipeline

    path, _, summary = swept
    port = free_port()  # nobody listens there
    sets = ["dpo.beta=0.05", "name=swp-sweep00", f"tracking.mlflow.uri=http://127.0.0.1:{port}"]
    with caplog.at_level(logging.WARNING):
        again = pipeline(PipelineParams(config=str(path), overrides=sets))
    assert again.executed == []  # tracking settings are in no key: everything is reused
    warned = [r for r in caplog.records if "MLflow at" in r.getMessage()]
    assert len(warned) == 1
    store = ArtifactStore(again.store)
    dpo = next(s for s in again.steps if s.step == "dpo")
    assert store.read_manifest("dpo", dpo.key)["metrics"]["pref_accuracy"] is not None


def test_compare_prints_config_and_metric_diff(swept) -> None:
    from flows.cli import app

    _, tmp, _ = swept
    store = str(tmp / "store")
    result = CliRunner().invoke(app, ["compare", "swp-sweep00", "swp-sweep01", "--store", store],
                                env={"COLUMNS": "200"})  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "dpo.beta" in result.output and "0.05" in result.output and "0.2" in result.output
    assert "sft.max_steps" not in result.output  # shared settings are not a difference
    bad = CliRunner().invoke(app, ["compare", "swp-sweep00", "nope", "--store", store])
    assert bad.exit_code == 2 and "no report of 'nope'" in bad.output
