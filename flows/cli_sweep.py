"""`fasttrack sweep | compare`: run a grid/random sweep and compare runs."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from fasttrack.core.errors import FastTrackError
from flows.cli_common import (
    _fail,
    _quiet_prefect_tracebacks,
    _split,
    app,
    console,
    err,
    rich_table,
    show,
    split_overrides,
)


@app.command()
def sweep(
    config: Annotated[
        str | None, typer.Argument(help="Run config YAML (its `sweep:` section)")
    ] = None,
    grid: Annotated[
        list[str] | None, typer.Option(help="FIELD=V1,V2,... (repeatable; e.g. dpo.beta=0.05,0.1)")
    ] = None,
    random_: Annotated[
        int | None, typer.Option("--random", help="Random search: this many points")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random search seed")] = None,
    metric: Annotated[str | None, typer.Option(help="Best point by this metric column")] = None,
    max_parallel: Annotated[int | None, typer.Option(help="Points run at once")] = None,
    stages: Annotated[list[str] | None, typer.Option(help="Stages of every point")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override KEY=VALUE")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Tracebacks")] = False,
) -> None:
    """Run one pipeline per point (shared stages built once) and compare the points."""
    from fasttrack.core.config import STAGES
    from fasttrack.core.config_loader import load_config
    from fasttrack.lib.sweeps import check_points, parse_grid, points

    sets = split_overrides(set_)
    if random_ is not None:
        sets += ["sweep.mode=random", f"sweep.samples={random_}"]
    if seed is not None:
        sets.append(f"sweep.seed={seed}")
    if max_parallel is not None and max_parallel < 1:
        _fail(FastTrackError(f"--max-parallel {max_parallel}: must be at least 1"))
    try:
        cfg = load_config(config, sets)
        fields = parse_grid(grid or [])
        plan = points(cfg.sweep, fields)
        check_points(config, sets, plan, cfg.name)
        from fasttrack.lib.preflight import preflight

        preflight(cfg, _split(stages) or list(STAGES))
    except FastTrackError as exc:
        _fail(exc)
    err.print(f"sweep {cfg.name}: {len(plan)} point(s)", highlight=False)
    if not verbose:
        _quiet_prefect_tracebacks()
    from flows.sweep import SweepParams
    from flows.sweep import sweep as sweep_flow

    params = SweepParams(config=config, grid=fields, overrides=sets, metric=metric,
                         max_parallel=max_parallel, stages=_split(stages) or None)  # fmt: skip
    from flows.prefect_server import use_local_api

    try:
        with use_local_api():
            summary = sweep_flow(params)
    except FastTrackError as exc:
        if verbose:
            raise
        _fail(exc)
    title = (f"sweep {summary.name}: {len(summary.rows)} points, {summary.executed_steps} "
             f"step(s) executed for {summary.distinct_keys} distinct keys")  # fmt: skip
    show(rich_table(summary.table, title=title))
    if summary.best:
        console.print(f"best by {summary.metric}: {summary.best}", highlight=False, soft_wrap=True)
    if summary.report:
        console.print(f"report: {summary.report}", soft_wrap=True, highlight=False)


@app.command()
def compare(
    run_a: Annotated[str, typer.Argument(help="Run (config) name")],
    run_b: Annotated[str, typer.Argument(help="Run (config) name")],
    store: Annotated[str, typer.Option(help="Store path or fsspec URL")] = "artifacts",
) -> None:
    """Config diff (the settings their artifacts were keyed on) and metric diff of two runs."""
    from fasttrack.core.store import ArtifactStore
    from fasttrack.core.store_admin import find_report
    from fasttrack.lib.compare import diff, keyed_config, run_metrics

    st = ArtifactStore(store)
    try:
        a, _ = find_report(st, run_a)
        b, _ = find_report(st, run_b)
    except FastTrackError as exc:
        _fail(exc)
    config = diff(keyed_config(st, a), keyed_config(st, b))
    metrics = diff(run_metrics(a), run_metrics(b))
    _show_diff(config, f"config: {run_a} (a) vs {run_b} (b)", "same keyed config")
    _show_diff(metrics, f"metrics: {run_a} (a) vs {run_b} (b)", "same metrics")


def _show_diff(rows: list[dict[str, Any]], title: str, same: str) -> None:
    if not rows:
        console.print(f"{title}: {same}", highlight=False, soft_wrap=True)
        return
    shown = [{k: _text(v) for k, v in r.items()} for r in rows]
    show(rich_table(shown, title=title))


def _text(v: Any) -> Any:
    return v if isinstance(v, int | float | str) or v is None else str(v)
