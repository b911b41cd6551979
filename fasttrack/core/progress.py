"""Training progress: Prefect progress artifact (UI) + in-process listeners (CLI).

Deliberately light (no torch/transformers/prefect import at module level): a training child
process imports it to forward its progress to the parent. The trainer-side callback lives in
fasttrack/lib/training.py.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

Listener = Callable[[str, int, int, dict[str, float]], None]  # (stage, step, total, last logs)
LISTENERS: list[Listener] = []


def in_prefect_run() -> bool:
    if "prefect" not in sys.modules:  # a training child: never imports prefect for this
        return False
    try:
        from prefect.context import TaskRunContext

        return TaskRunContext.get() is not None
    except Exception:
        return False


class ProgressReporter:
    """One stage's progress -> Prefect progress artifact (inside a run) + in-process listeners.

    Used by the trainer callback in-process, and by the parent replaying a training child's
    events (the child has no Prefect context; the parent's task run owns the artifact).
    """

    def __init__(self, stage: str):
        self.stage = stage
        self.artifact_id: Any = None

    def update(self, step: int, total: int, logs: dict[str, float]) -> None:
        progress = 100.0 * step / max(total, 1)
        if self.artifact_id is None and in_prefect_run():
            from prefect.artifacts import create_progress_artifact

            self.artifact_id = create_progress_artifact(
                progress=progress, description=f"{self.stage}: training progress"
            )
        elif self.artifact_id is not None:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.artifact_id, progress=progress)
        for listener in LISTENERS:
            listener(self.stage, step, total, logs)
