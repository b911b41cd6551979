"""Evaluation report, Prefect table/markdown artifacts and promotion gates through the flow."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fasttrack.lib.gates import GateError
from flows.cli import app
from flows.pipeline import PipelineParams, pipeline
from tests.conftest import tiny_config_dict, write_config

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_harness")]
STAGES = ["data", "pretrain", "evaluate"]
MC = "lm_eval.fasttrack_stdlib_mc.acc"  # the shipped lm-evaluation-harness task, in the table


def _artifact(key: str):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    return max(found, key=lambda a: a.created)


def test_passing_gates_promote_and_the_table_is_in_prefect(tmp_path: Path) -> None:
    d = tiny_config_dict(tmp_path / "store", name="gated")
    d["evaluate"]["gates"] = ["pretrain.perplexity < base.perplexity"]
    d["evaluate"]["seeds"] = [1, 2]  # sampled answers re-generated: spread in the report
    d["evaluate"]["lm_eval"] = {"tasks": ["fasttrack_stdlib_mc"], "limit": 8}  # shipped task
    d["generation"] = {"max_new_tokens": 8, "strategy": "sample"}
    path = write_config(tmp_path / "c.yaml", d)
    summary = pipeline(PipelineParams(config=str(path), stages=STAGES))
    row = {r["model"]: r for r in summary.table}["pretrain"]
    for metric in ("perplexity", "rouge1", "rouge2", "rougeL", "bleu", "sft_loss", "pref_accuracy"):
        assert row[metric] is not None, metric
    table = _artifact("fasttrack-metrics").data  # read back through the Prefect client
    table = json.loads(table) if isinstance(table, str) else table
    assert {r["model"] for r in table} == {"base", "pretrain"}
    assert _artifact("fasttrack-report").data.startswith("# FastTrack report: `gated`")
    promoted = json.loads((tmp_path / "store" / "promoted.json").read_text())
    pre = next(s for s in summary.steps if s.step == "pretrain")
    assert promoted["gated"]["promoted"] == pre.key

    result = CliRunner().invoke(app, ["report", "gated", "--store", str(tmp_path / "store")])
    assert result.exit_code == 0 and "Promotion gates" in result.stdout
    assert "PASS pretrain.perplexity < base.perplexity" in result.stdout
    report = _artifact("fasttrack-report").data  # report.md as published
    _intervals_verdicts_and_reproducibility(path, summary, table, report)


def _intervals_verdicts_and_reproducibility(path: Path, summary, table, report: str) -> None:
    """Every metric carries its interval (table rows, Prefect table, report), the report has
    the stage-to-stage verdicts, and `--force evaluate` gives identical numbers."""
    import re

    from fasttrack.lib.evalstats import SCORES_FILE

    row = {r["model"]: r for r in summary.table}["pretrain"]
    for metric in ("perplexity", "rougeL", "bleu", "sft_loss", "pref_accuracy", MC):
        low, high = row["ci"][metric]
        tol = 1e-4 * max(1.0, abs(row[metric]))  # the value is rounded to 4-6 decimals
        assert low - tol <= row[metric] <= high + tol or metric == "bleu", (metric, row)
    shown = {r["model"]: r for r in table}["pretrain"]
    assert re.fullmatch(r"[\d.e+-]+ \[[\d.e+-]+, [\d.e+-]+\]", shown["perplexity"]), shown
    assert "percentile-bootstrap interval" in report and "## Stage to stage" in report
    assert re.search(r"\| base → pretrain \| perplexity \|.*\| (improved|worse|no sig)", report)
    assert f" {MC} |" in report  # a column of the report's table
    assert "## Across generation seeds" in report and "| pretrain | rougeL |" in report
    evals = {s.step: s for s in summary.steps if s.step.startswith("evaluate")}
    store = path.parent / "store"
    scores = json.loads((store / "evaluate" / evals["evaluate:pretrain"].key / SCORES_FILE)
                        .read_text())  # fmt: skip
    assert scores["documents"]["columns"] == ["nll", "tokens", "bytes"] and scores["sft"]["rows"]
    again = pipeline(PipelineParams(config=str(path), stages=STAGES, force=["evaluate"]))
    assert {s.step for s in again.steps if s.status != "cached"} >= set(evals)
    assert again.table == summary.table  # same machine, same seed: identical numbers


def test_a_failing_gate_fails_the_run_naming_gate_and_values(tmp_path: Path) -> None:
    d = tiny_config_dict(tmp_path / "store", name="strict")
    d["evaluate"]["gates"] = ["pretrain.perplexity < 1.5"]
    path = write_config(tmp_path / "c.yaml", d)
    state = pipeline(PipelineParams(config=str(path), stages=STAGES), return_state=True)
    assert state.is_failed()
    with pytest.raises(GateError, match=r"FAIL pretrain.perplexity < 1.5 \(\d+\.?\d* vs 1.5\)"):
        state.result()
    assert not (tmp_path / "store" / "promoted.json").exists()
    assert list((tmp_path / "store" / "report").iterdir())  # the artifacts stay for inspection
