"""The Trainer callback every training stage adds: losses to the log, step/total to progress.

Kept apart from fasttrack/lib/training.py (key helpers, the child launcher) because subclassing
`TrainerCallback` imports transformers and torch, which only a training child needs.
"""

from __future__ import annotations

import time

from transformers import TrainerCallback

from fasttrack.core.log import get_logger
from fasttrack.core.progress import ProgressReporter


class ProgressCallback(TrainerCallback):
    """Logs losses every `logging_steps` and reports step/total (at most every 2 s)."""

    def __init__(self, stage: str, min_interval_s: float = 2.0):
        self.stage = stage
        self.min_interval_s = min_interval_s
        self.reporter = ProgressReporter(stage)
        self.last_update = 0.0
        self.last_logs: dict[str, float] = {}
        self.log = get_logger()

    def on_train_begin(self, args, state, control, **kwargs):
        start = state.global_step
        resumed = f" (resuming from step {start})" if start else ""
        self.log.info("%s: training %d steps%s", self.stage, state.max_steps, resumed)
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
        self.reporter.update(state.global_step, state.max_steps, dict(self.last_logs))
