"""End-to-end: the real flow on a tiny model, through Prefect, asserting effects."""

import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch

from fasttrack.core.store import ArtifactStore
from flows.pipeline import PipelineParams, pipeline
from tests.e2e.storecheck import cli_env, cli_imports

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_harness")]
TRAINING_STEPS = ["data", "base", "pack", "pretrain", "sft", "dpo_ref", "dpo", "rag"]
EVAL_STEPS = [
    "evaluate:base",
    "evaluate:pretrain",
    "evaluate:sft",
    "evaluate:dpo",
    "evaluate:dpo+rag",
]


def _task_run_states(flow_run_id, expected: int) -> list[str]:
    """Task-run state names as the Prefect API reports them (events arrive asynchronously)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    names: list[str] = []
    for _ in range(100):
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
        names = sorted(r.state.name for r in runs if r.state and r.state.is_final())
        if len(names) == expected:
            return names
        time.sleep(0.2)
    return names


def test_pipeline_trains_caches_and_reruns_only_what_changed(tiny_cfg_path: Path, tiny_cfg) -> None:
    params = PipelineParams(config=str(tiny_cfg_path))
    first = pipeline(params)
    assert [s.step for s in first.steps] == [*TRAINING_STEPS, *EVAL_STEPS, "report"]
    assert len(first.executed) == 14
    pre = next(s for s in first.steps if s.step == "pretrain").metrics
    assert pre["last_logged_loss"] < pre["first_logged_loss"] - 0.3  # it learned
    base_row, pre_row = first.table[:2]
    assert [r["model"] for r in first.table] == ["base", "pretrain", "sft", "dpo", "dpo+rag"]
    assert pre_row["perplexity"] < base_row["perplexity"] / 2

    # The published model is a stock HF model, and its stored perplexity is reproducible by hand.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store = ArtifactStore(tiny_cfg.store)
    pre_ref = store.lookup("pretrain", next(s.key for s in first.steps if s.step == "pretrain"))
    model = AutoModelForCausalLM.from_pretrained(pre_ref.uri).eval()
    tok = AutoTokenizer.from_pretrained(pre_ref.uri)
    ids = tok("Assignment statements", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=5, do_sample=False).shape[1] == ids.shape[1] + 5
    eval_key = next(s.key for s in first.steps if s.step == "evaluate:pretrain")
    protocol = json.loads((Path(store.uri("evaluate", eval_key)) / "manifest.json").read_text())[
        "protocol"
    ]
    assert protocol["max_length"] == 64 and protocol["stride"] == 32
    assert pre_row["perplexity"] == pytest.approx(
        math.exp(protocol["nll_sum"] / protocol["tokens_scored"]), rel=1e-4
    )

    # Same config again: nothing executes, Prefect shows every task as Cached, same table.
    state = pipeline(params, return_state=True)
    second = state.result()
    assert second.executed == [] and second.table == first.table
    assert _task_run_states(state.state_details.flow_run_id, 14) == ["Cached"] * 14

    # The same cached run as a user starts it (a fresh `fasttrack run` process) imports no ML
    # library: they are most of a cached run's start-up on 2 cores (benchmarks/cached_run.py).
    from prefect.settings import PREFECT_API_URL

    env = cli_env(tiny_cfg_path.parent / "ph", PREFECT_API_URL.value())
    proc, heavy = cli_imports(["run", str(tiny_cfg_path)], env)
    assert proc.returncode == 0 and "0 step(s) executed" in proc.stdout, proc.stderr[-3000:]
    assert heavy == [], heavy

    # One pretrain field changed: pretrain and what depends on it re-run; data, base, pack and
    # the base model's evaluation do not.
    third = pipeline(
        PipelineParams(config=str(tiny_cfg_path), overrides=["pretrain.learning_rate=8e-3"])
    )
    assert sorted(third.executed) == sorted(
        ["pretrain", "sft", "dpo_ref", "dpo", "evaluate:pretrain", "evaluate:sft", "evaluate:dpo"]
        + ["evaluate:dpo+rag", "report"]
    )
    assert third.table[0] == first.table[0] and third.table[1] != first.table[1]

    # --force re-executes exactly the forced step.
    forced = pipeline(PipelineParams(config=str(tiny_cfg_path), force=["data"]))
    assert forced.executed == ["data"]

    # The store is the source of truth: delete an artifact behind Prefect's back -> rebuilt,
    # never a Cached ref to a missing artifact.
    shutil.rmtree(pre_ref.uri)
    fourth = pipeline(params)
    assert fourth.executed == ["pretrain"]
    assert store.lookup("pretrain", pre_ref.key) is not None


def test_stage_selection(tmp_path: Path) -> None:
    from tests.conftest import tiny_config_dict, write_config

    path = write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path / "s"))
    only_data = pipeline(PipelineParams(config=str(path), stages=["data"]))
    assert [s.step for s in only_data.steps] == ["data"] and only_data.table == []
    eval_only = pipeline(PipelineParams(config=str(path), stages=["evaluate"]))
    assert [s.step for s in eval_only.steps] == ["data", "base", "evaluate:base", "report"]
    assert [r["model"] for r in eval_only.table] == ["base"]
    assert torch.isfinite(torch.tensor(eval_only.table[0]["perplexity"]))
