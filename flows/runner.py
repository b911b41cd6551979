"""Run bookkeeping: which steps executed or were cached.

Kept out of the flow module so it stays an outline: `StepRunner` calls a stage task, records whether
Prefect/the store answered it from cache, and returns the ref.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel

from fasttrack.core.store import ArtifactRef
from fasttrack.lib.tracking import StepInfo


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
    report: str | None = None  # path of this run's report.md, when evaluate ran

    @property
    def executed(self) -> list[str]:
        return [s.step for s in self.steps if s.status == "executed"]


class StepRunner:
    """Run stage tasks with per-step force flags; remember what ran and what was reused."""

    def __init__(
        self, force: list[str] | None = None, on_step: Callable[[StepInfo], None] | None = None
    ):
        self.force = set(force or [])
        self.steps: list[StepRecord] = []
        self.on_step = on_step  # e.g. the run's Tracker (fasttrack/lib/tracking.py)

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
        if self.on_step is not None:
            self.on_step(StepInfo(step, ref, status, round(seconds, 3)))
        return ref
