"""Run bookkeeping: which steps executed or were cached, and the metrics table of the run.

Kept out of flows/ so the flow stays an outline: `StepRunner` calls a stage task, records whether
Prefect/the store answered it from cache, and returns the ref.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel

from tasks.store import ArtifactRef

TABLE_KEY = "fasttrack-metrics"
TABLE_COLUMNS = ("perplexity", "bits_per_byte", "sft_loss", "pref_accuracy", "pref_margin")


class StepRecord(BaseModel):
    step: str
    key: str
    status: Literal["executed", "cached"]
    seconds: float
    metrics: dict[str, Any] = {}


class RunSummary(BaseModel):
    name: str
    store: str
    steps: list[StepRecord]
    table: list[dict[str, Any]]

    @property
    def executed(self) -> list[str]:
        return [s.step for s in self.steps if s.status == "executed"]


class StepRunner:
    """Run stage tasks with per-step force flags; remember what ran and what was reused."""

    def __init__(self, force: list[str] | None = None):
        self.force = set(force or [])
        self.steps: list[StepRecord] = []

    def __call__(self, task: Any, *args: Any, label: str | None = None) -> ArtifactRef:
        name = task.name
        forced = name in self.force or "all" in self.force
        started = time.perf_counter()
        state = task(*args, force=forced, return_state=True)
        ref: ArtifactRef = state.result()  # re-raises the task's error if it failed
        self.steps.append(
            StepRecord(
                step=label or name,
                key=ref.key,
                status="cached" if state.name == "Cached" else "executed",
                seconds=round(time.perf_counter() - started, 3),
                metrics=ref.metrics,
            )
        )
        return ref


def metrics_table(evals: dict[str, ArtifactRef]) -> list[dict[str, Any]]:
    """One row per evaluated model (stage name), the metric columns of TABLE_COLUMNS."""
    rows = []
    for model, ref in evals.items():
        row: dict[str, Any] = {"model": model}
        row.update({col: ref.metrics.get(col) for col in TABLE_COLUMNS})
        row["eval_key"] = ref.short
        rows.append(row)
    return rows


def publish_table(rows: list[dict[str, Any]], run_name: str) -> None:
    """The metrics table as a Prefect table artifact with a stable key (history in the UI)."""
    from prefect.artifacts import create_table_artifact

    create_table_artifact(
        table=rows, key=TABLE_KEY, description=f"FastTrack metrics of run config `{run_name}`"
    )
