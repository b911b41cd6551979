"""PNG figures for the evaluation report: training loss curves and per-metric model bars.

Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg canvas, never
through ``pyplot``: no display is needed, the global backend is left alone, and no figure is
registered anywhere, so nothing leaks. Sizes are fixed (no ``bbox_inches="tight"``): a figure with
``ncols`` x ``nrows`` panels is ``ncols * PANEL_W`` x ``nrows * PANEL_H`` pixels.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100
PANEL_W, PANEL_H = 480, 360  # pixels per subplot
MAX_COLS = 3
LOG_SCALE_METRICS = frozenset({"perplexity"})


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for entry in history:
        step, value = _number(entry.get("step")), _number(entry.get(key))
        if step is not None and value is not None:
            steps.append(step)
            values.append(value)
    return steps, values


def _figure(panels: int) -> tuple[Figure, list[Any]]:
    ncols = min(panels, MAX_COLS)
    nrows = math.ceil(panels / ncols)
    fig = Figure(figsize=(ncols * PANEL_W / DPI, nrows * PANEL_H / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=DPI)
    fig.clear()
    return path


def loss_curves(histories: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """One panel per stage (in the dict's order) with ``loss`` and ``eval_loss`` against ``step``,
    from Hugging Face Trainer ``log_history`` lists. Stages with no points are skipped; raises
    ``ValueError`` if no stage has any."""
    curves = []
    for stage, history in histories.items():
        train, evals = _series(history or [], "loss"), _series(history or [], "eval_loss")
        if train[0] or evals[0]:
            curves.append((stage, train, evals))
    if not curves:
        raise ValueError("no loss or eval_loss points to plot")
    fig, axes = _figure(len(curves))
    for ax, (stage, train, evals) in zip(axes, curves, strict=True):
        if train[0]:
            ax.plot(*train, label="loss", marker="." if len(train[0]) < 30 else None)
        if evals[0]:
            ax.plot(*evals, label="eval_loss", marker="o")
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def metric_bars(table: list[dict[str, Any]], metrics: list[str], path: Path) -> Path:
    """One panel per metric with one bar per model row (``row["model"]``). Missing or None values
    are skipped, as are metrics without any value; ``perplexity`` uses a log axis. Raises
    ``ValueError`` if there is nothing to plot."""
    panels = []
    for metric in metrics:
        bars = [
            (i, str(row.get("model", f"row {i}")), v)
            for i, row in enumerate(table)
            if (v := _number(row.get(metric))) is not None
        ]
        if metric in LOG_SCALE_METRICS:
            bars = [b for b in bars if b[2] > 0]
        if bars:
            panels.append((metric, bars))
    if not panels:
        raise ValueError("no metric values to plot")
    fig, axes = _figure(len(panels))
    for ax, (metric, bars) in zip(axes, panels, strict=True):
        rows, names, values = zip(*bars, strict=True)
        colors = [f"C{i % 10}" for i in rows]  # a model keeps its colour across panels
        positions = range(len(names))
        ax.bar_label(ax.bar(positions, values, color=colors), fmt="%.3g")
        ax.set_xticks(list(positions), names, rotation=20, ha="right")
        if metric in LOG_SCALE_METRICS:
            ax.set_yscale("log")
        ax.margins(y=0.12)  # room for the value labels
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def metric_vs_field(
    points: list[dict[str, Any]], field: str, metrics: list[str], path: Path
) -> Path:
    """Sweep figure: one panel per metric, its value at each point against the swept `field`
    (points: ``{"delta": {field: value}, "metrics": {metric: value}}``); numeric fields on a
    numeric axis, others as categories. Raises ``ValueError`` if there is nothing to plot."""
    panels = []
    for metric in metrics:
        pts = [(p["delta"].get(field), v) for p in points
               if (v := _number(p["metrics"].get(metric))) is not None]  # fmt: skip
        if pts:
            panels.append((metric, pts))
    if not panels:
        raise ValueError(f"no metric values to plot against {field}")
    fig, axes = _figure(len(panels))
    for ax, (metric, pts) in zip(axes, panels, strict=True):
        numeric = all(_number(x) is not None for x, _ in pts)
        if numeric:
            pts = sorted(pts, key=lambda p: float(p[0]))
            ax.plot([float(x) for x, _ in pts], [y for _, y in pts], marker="o", linestyle="")
        else:
            labels = sorted({str(x) for x, _ in pts})
            ax.plot([labels.index(str(x)) for x, _ in pts], [y for _, y in pts], marker="o",
                    linestyle="")  # fmt: skip
            ax.set_xticks(range(len(labels)), labels)
        if metric in LOG_SCALE_METRICS and all(y > 0 for _, y in pts):
            ax.set_yscale("log")
        ax.set_title(f"{metric} vs {field}")
        ax.set_xlabel(field)
        ax.grid(alpha=0.3)
    return _save(fig, path)
