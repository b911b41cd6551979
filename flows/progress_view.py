"""Rich progress bar for training steps in the CLI, fed by fasttrack.core.progress listeners."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fasttrack.core.progress import LISTENERS


@contextmanager
def training_progress(console: Console) -> Iterator[None]:
    """Show one bar per training stage while the block runs (only on a terminal)."""
    if not console.is_terminal:
        yield
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[loss]}"),
        TimeElapsedColumn(),
        console=console,
    )
    bars: dict[str, int] = {}

    def update(stage: str, step: int, total: int, logs: dict[str, float]) -> None:
        if stage not in bars:
            bars[stage] = progress.add_task(stage, total=total, loss="")
        loss = f"loss {logs['loss']:.3f}" if "loss" in logs else ""
        progress.update(bars[stage], completed=step, total=total, loss=loss)

    LISTENERS.append(update)
    try:
        with progress:
            yield
    finally:
        LISTENERS.remove(update)
