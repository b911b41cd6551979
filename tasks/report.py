"""Run bookkeeping: which steps executed or were cached, and the metrics table of the run.

Kept out of flows/ so the flow stays an outline: `StepRunner` calls a stage task, records whether
Prefect/the store answered it from cache, and returns the ref.
"""

from __future__ import annotations

import inspect
import time
from typing import Any, Literal

from pydantic import BaseModel

from tasks.store import ArtifactRef

TABLE_KEY = "fasttrack-metrics"
TABLE_COLUMNS = ("perplexity", "bits_per_byte", "sft_loss", "rouge1", "rouge2", "rougeL", "bleu",
                 "pref_accuracy", "pref_margin", "recall@5")  # fmt: skip
RETRIEVAL_COLUMNS = ("recall@1", "recall@5", "recall@10", "mrr")


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
    retrieval: list[dict[str, Any]] = []
    exports: list[dict[str, Any]] = []

    @property
    def executed(self) -> list[str]:
        return [s.step for s in self.steps if s.status == "executed"]


class StepRunner:
    """Run stage tasks with per-step force flags; remember what ran and what was reused."""

    def __init__(self, force: list[str] | None = None):
        self.force = set(force or [])
        self.steps: list[StepRecord] = []

    def __call__(self, task: Any, *args: Any, label: str | None = None) -> ArtifactRef:
        started = time.perf_counter()
        state = task(*args, force=self._forced(task), return_state=True)
        return self._record(label or task.name, state, time.perf_counter() - started)

    def submit(self, task: Any, *args: Any, label: str | None = None, runner: Any = None) -> Any:
        """Start a step concurrently; `collect` it later. `runner`: a started Prefect task
        runner (e.g. Dask) to use instead of the flow's own."""
        started, finished = time.perf_counter(), []
        if runner is None:
            future = task.submit(*args, force=self._forced(task))
        else:
            bound = inspect.signature(task.fn).bind(*args, force=self._forced(task))
            future = runner.submit(task, parameters=dict(bound.arguments))
        future.add_done_callback(lambda _: finished.append(time.perf_counter()))
        return label or task.name, future, started, finished

    def collect(self, pending: Any) -> ArtifactRef:
        name, future, started, finished = pending
        future.wait()
        end = finished[0] if finished else time.perf_counter()
        return self._record(name, future.state, end - started)

    def _forced(self, task: Any) -> bool:
        return task.name in self.force or "all" in self.force

    def _record(self, step: str, state: Any, seconds: float) -> ArtifactRef:
        ref: ArtifactRef = state.result()  # re-raises the task's error if it failed
        status = "cached" if state.name == "Cached" else "executed"
        self.steps.append(StepRecord(step=step, key=ref.key, status=status,
                                     seconds=round(seconds, 3), metrics=ref.metrics))  # fmt: skip
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


def retrieval_table(rag: ArtifactRef) -> list[dict[str, Any]]:
    """One row per retrieval mode (dense, bm25, hybrid) of the RAG artifact's evaluation."""
    rows = []
    for mode in ("dense", "bm25", "hybrid"):
        values = {c: rag.metrics.get(f"{mode}.{c}") for c in RETRIEVAL_COLUMNS}
        if any(v is not None for v in values.values()):
            rows.append({"retrieval": mode, **values})
    return rows


def publish_table(rows: list[dict[str, Any]], run_name: str) -> None:
    """The metrics table as a Prefect table artifact with a stable key (history in the UI)."""
    from prefect.artifacts import create_table_artifact

    create_table_artifact(
        table=rows, key=TABLE_KEY, description=f"FastTrack metrics of run config `{run_name}`"
    )
