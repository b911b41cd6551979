"""The sweep flow: one pipeline sub-flow per point, `max_parallel` at a time, one comparison.

Points share every artifact their keys share: a sweep over `dpo.beta` builds data, pretrain,
SFT and dpo_ref once. Points running at the same time never build a shared key twice: the
first takes the key's lock in the store (fasttrack/core/stage.run_stage), the others wait on it
and reuse what it published (their step is recorded `cached`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field

from fasttrack.core.config_loader import load_config
from fasttrack.core.store import ArtifactStore
from fasttrack.lib.chain import MODEL_ORDER
from fasttrack.lib.sweeps import (
    best_point,
    check_points,
    comparison,
    goal_of,
    point_metrics,
    point_name,
    point_sets,
    points,
)
from flows.pipeline import PipelineParams, pipeline
from flows.runner import RunSummary

SWEEP_TABLE_KEY = "fasttrack-sweep"


class SweepParams(BaseModel):
    config: str | None = Field(None, description="Run config YAML (its `sweep:` section).")
    grid: dict[str, list[Any]] = Field({}, description="Field -> values (adds to sweep.params).")
    overrides: list[str] = Field([], description="--set overrides applied to every point.")
    stages: list[str] | None = Field(None, description="Stages of every point (default: all).")
    metric: str | None = Field(None, description="Best point by this column (sweep.metric).")
    max_parallel: int | None = Field(None, ge=1, description="Points at once (sweep.max_parallel).")


class SweepSummary(BaseModel):
    name: str
    fields: list[str]
    rows: list[dict[str, Any]]  # point, delta, metrics, executed, keys
    table: list[dict[str, Any]]  # the comparison table as shown
    metric: str | None
    best: str | None
    executed_steps: int
    distinct_keys: int
    report: str | None = None
    plots: list[str] = []


@task(name="sweep-point")
def run_point(params: PipelineParams) -> RunSummary:
    """One point: the pipeline as a sub-flow (its own flow run in the UI)."""
    return pipeline(params)


@flow(name="fasttrack-sweep")
def sweep(params: SweepParams) -> SweepSummary:
    """Expand the points, run them on a bounded thread pool, compare them."""
    cfg = load_config(params.config, params.overrides)
    grid_points = points(cfg.sweep, params.grid)
    fields = list(grid_points[0])
    parallel = params.max_parallel or cfg.sweep.max_parallel
    metric = params.metric or cfg.sweep.metric
    stages = params.stages
    check_points(params.config, params.overrides, grid_points, cfg.name)  # before any runs
    kw = {"stages": stages} if stages else {}
    runs = [PipelineParams(config=params.config, **kw,
                           overrides=point_sets(params.overrides, p, point_name(cfg.name, i)))
            for i, p in enumerate(grid_points)]  # fmt: skip
    with ThreadPoolTaskRunner(max_workers=parallel) as runner:
        futures = [runner.submit(run_point, parameters={"params": p}) for p in runs]
        summaries: list[RunSummary] = [f.result() for f in futures]
    rows = [_row(point_name(cfg.name, i), p, s)
            for i, (p, s) in enumerate(zip(grid_points, summaries, strict=True))]  # fmt: skip
    table, metric_cols = comparison(rows, fields)
    metric = metric or next((m for m in ("pref_accuracy", "perplexity") if m in metric_cols), None)
    best = best_point(rows, metric, cfg.sweep.goal) if metric else None
    summary = SweepSummary(
        name=cfg.name, fields=fields, rows=rows, table=table, metric=metric,
        best=best["point"] if best else None,
        executed_steps=sum(r["executed"] for r in rows),
        distinct_keys=len({k for r in rows for k in r["keys"]}),
    )  # fmt: skip
    write_report(cfg, summary, metric_cols)
    publish(summary)
    return summary


def _row(name: str, point: dict[str, Any], s: RunSummary) -> dict[str, Any]:
    models = {r["model"] for r in s.table}
    newest = next((m for m in MODEL_ORDER if m in models), None)
    return {
        "point": name,
        "delta": point,
        "metrics": point_metrics(s.table, newest),
        "model": newest,
        "executed": len(s.executed),
        "keys": sorted({f"{st.step}:{st.key}" for st in s.steps}),
        "report": s.report,
    }


def write_report(cfg: Any, summary: SweepSummary, metrics: list[str]) -> None:
    """`<store>/sweeps/<name>/`: sweep.json, sweep.md and one plot per swept field (local
    stores; the Prefect artifacts carry the table either way)."""
    store = ArtifactStore(cfg.store)
    if not store.local:
        return
    out = Path(store.root) / "sweeps" / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    summary.plots = _plots(summary, metrics, out)
    summary.report = str(out / "sweep.md")
    (out / "sweep.md").write_text(markdown(summary))
    (out / "sweep.json").write_text(json.dumps(summary.model_dump(), indent=2, default=str))


def _plots(summary: SweepSummary, metrics: list[str], out: Path) -> list[str]:
    from fasttrack.lib.plots import metric_vs_field

    made = []
    for f in summary.fields:
        try:
            made.append(str(metric_vs_field(summary.rows, f, metrics, out / f"{f}.png")))
        except ValueError:  # nothing numeric to plot against this field
            continue
    return made


def markdown(summary: SweepSummary) -> str:
    cols = list(summary.table[0]) if summary.table else []
    lines = [f"# Sweep `{summary.name}`", "",
             f"{len(summary.rows)} points over {', '.join(summary.fields)}: "
             f"{summary.executed_steps} steps executed for {summary.distinct_keys} distinct keys.",
             "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]  # fmt: skip
    for row in summary.table:
        lines.append("| " + " | ".join(_cell(row[c]) for c in cols) + " |")
    if summary.best:
        goal = goal_of(summary.metric or "")
        lines += ["", f"Best by `{summary.metric}` ({goal}): **{summary.best}**"]
    lines += [""] + [f"![{Path(p).name}]({Path(p).name})" for p in summary.plots]
    return "\n".join(lines) + "\n"


def _cell(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else "–" if v is None else str(v)


def publish(summary: SweepSummary) -> None:
    """The comparison as Prefect table + markdown artifacts (stable keys: history in the UI)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    desc = f"sweep {summary.name}: best {summary.best} by {summary.metric}"
    create_table_artifact(table=summary.table, key=SWEEP_TABLE_KEY, description=desc)
    create_markdown_artifact(markdown=markdown(summary), key=f"{SWEEP_TABLE_KEY}-report",
                             description=desc)  # fmt: skip
