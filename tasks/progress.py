"""Training progress: Prefect run logger + progress artifact (UI) + in-process listeners (CLI).

Why a callback: HF/TRL trainers own the training loop; a `TrainerCallback` is the supported way
to observe it without forking the loop. Listeners let the CLI draw a rich progress bar while the
same events reach the Prefect UI.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback

from tasks.stage import get_logger

Listener = Callable[[str, int, int, dict[str, float]], None]  # (stage, step, total, last logs)
LISTENERS: list[Listener] = []


def in_prefect_run() -> bool:
    try:
        from prefect.context import TaskRunContext

        return TaskRunContext.get() is not None
    except Exception:
        return False


class ProgressCallback(TrainerCallback):
    """Logs losses and reports step/total to Prefect and to registered listeners."""

    def __init__(self, stage: str, min_interval_s: float = 2.0):
        self.stage = stage
        self.min_interval_s = min_interval_s
        self.artifact_id: Any = None
        self.last_update = 0.0
        self.last_logs: dict[str, float] = {}
        self.log = get_logger()

    def on_train_begin(self, args, state, control, **kwargs):
        start = state.global_step
        resumed = f" (resuming from step {start})" if start else ""
        self.log.info("%s: training %d steps%s", self.stage, state.max_steps, resumed)
        if in_prefect_run():
            from prefect.artifacts import create_progress_artifact

            self.artifact_id = create_progress_artifact(
                progress=100.0 * start / max(state.max_steps, 1),
                description=f"{self.stage}: training progress",
            )
        self._notify(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = {k: v for k, v in (logs or {}).items() if isinstance(v, int | float)}
        self.last_logs.update(logs)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in logs.items() if k != "epoch")
        self.log.info("%s: step %d/%d %s", self.stage, state.global_step, state.max_steps, shown)

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() - self.last_update >= self.min_interval_s:
            self._notify(state)

    def on_train_end(self, args, state, control, **kwargs):
        self._notify(state)

    def _notify(self, state) -> None:
        self.last_update = time.monotonic()
        if self.artifact_id is not None:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(
                self.artifact_id, progress=100.0 * state.global_step / max(state.max_steps, 1)
            )
        for listener in LISTENERS:
            listener(self.stage, state.global_step, state.max_steps, self.last_logs)
