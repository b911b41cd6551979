"""Evaluations fan out on a Dask LocalCluster: three models are evaluated at the same time
(overlapping task-run intervals, read back through the Prefect API)."""

from __future__ import annotations

import pytest

from tests.conftest import tiny_config_dict, write_config

pytestmark = pytest.mark.e2e


def test_three_evaluations_run_in_parallel_on_dask(tmp_path, prefect_harness):
    pytest.importorskip("prefect_dask")
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.pipeline import PipelineParams, pipeline

    d = tiny_config_dict(
        tmp_path / "store", dpo={"enabled": False}, rag={"enabled": False},
        compute={"task_runner": "dask", "eval_workers": 3},
    )  # fmt: skip
    cfg = write_config(tmp_path / "dask.yaml", d)
    stages = ["data", "pretrain", "sft", "evaluate"]
    state = pipeline(PipelineParams(config=str(cfg), stages=stages), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert {"evaluate:base", "evaluate:pretrain", "evaluate:sft"} <= {s.step for s in summary.steps}

    flt = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        runs = [
            r for r in client.read_task_runs(flow_run_filter=flt) if r.name.startswith("evaluate")
        ]
    assert len(runs) == 3 and all(r.state.is_completed() for r in runs)
    latest_start = max(r.start_time for r in runs)
    earliest_end = min(r.end_time for r in runs)
    assert latest_start < earliest_end, "the three evaluations did not overlap in time"
