"""`fasttrack` command line: run the pipeline, list artifacts.

    fasttrack run                                  # embedded default pipeline_configs/tiny-cpu.yaml
    fasttrack run CONFIG --stages data,pretrain --force pretrain --set pretrain.max_steps=50
    fasttrack plan [CONFIG] [--gpu-mem 24GiB]     # memory/FLOPs per training stage
    fasttrack ask [CONFIG] "question" [--model sft] [--server URL]   # RAG answer with sources
    fasttrack serve [CONFIG] [--model promoted|dpo|sft|pretrain|KEY] [--port 8000]   # OpenAI API
    fasttrack report [RUN|latest] [--store artifacts]   # re-print a past run's report
    fasttrack ls [--store artifacts]
    fasttrack deploy | worker --queue gpu | zombies   # scheduled runs on a Prefect server
    fasttrack verify [--store artifacts] [--no-quarantine]   # re-hash every artifact
    fasttrack gc --older-than 7d [--dry-run] [--store artifacts]
    fasttrack export [CONFIG] --format gguf-q8_0 --format merged [--model sft|KEY]
    fasttrack sweep [CONFIG] --grid dpo.beta=0.05,0.1 --grid adapter.lora.r=8,16 [--max-parallel 2]
    fasttrack compare RUN_A RUN_B [--store artifacts]   # config + metric diff of two runs

Without PREFECT_API_URL the flow runs on a local Prefect API started in the background on first
use and shared by later commands (`fasttrack server status|stop`;
FASTTRACK_PREFECT_SERVER=ephemeral: a per-process API instead); with a server set, the same
command shows up in the Prefect UI.
"""

from __future__ import annotations

from typing import Annotated

import typer
import typer.core
from rich.table import Table

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
def run(
    config: Annotated[
        str | None, typer.Argument(help="Run config YAML (default: tiny-cpu)")
    ] = None,
    stages: Annotated[list[str] | None, typer.Option(help="Stages, comma-separated")] = None,
    force: Annotated[list[str] | None, typer.Option(help="Steps to recompute (or all)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override KEY=VALUE")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Tracebacks")] = False,
) -> None:
    """Run the pipeline (cached stages are reused, not recomputed)."""
    from fasttrack.core.config_loader import load_config

    try:
        cfg = load_config(config, split_overrides(set_))  # fail fast, before Prefect starts
        from fasttrack.core.config import STAGES
        from fasttrack.lib.preflight import preflight
        from flows.steps import check_names

        check_names(_split(stages), _split(force))

        # before importing the flow (Prefect + every stage's libraries: most of a minute on
        # a busy 2-core machine, benchmarks/results/preflight.json)
        preflight(cfg, _split(stages) or list(STAGES))
        from flows.pipeline import PipelineParams, check_params, pipeline

        params = PipelineParams(
            config=config,
            stages=_split(stages) or list(STAGES),
            overrides=split_overrides(set_),
            force=_split(force),
        )
        check_params(params)
    except FastTrackError as exc:
        _fail(exc)
    if not verbose:
        _quiet_prefect_tracebacks()
    from fasttrack.lib.training import prestart_children
    from flows.prefect_server import use_local_api
    from flows.progress_view import training_progress

    prestart_children(cfg, params.stages)  # a fresh store: its imports overlap the API start
    try:
        with use_local_api(), training_progress(err):
            summary = pipeline(params)
    except FastTrackError as exc:
        if verbose:
            raise
        _fail(exc)
    steps = Table(title=f"run {summary.name}: {len(summary.executed)} step(s) executed")
    for col in ("step", "key", "status", "seconds"):
        steps.add_column(col)
    for s in summary.steps:
        colour = "green" if s.status == "cached" else "yellow"
        steps.add_row(s.step, s.key[:12], f"[{colour}]{s.status}[/]", f"{s.seconds:.1f}")
    show(steps)
    if summary.table:
        from fasttrack.lib.tables import display_rows

        show(rich_table(display_rows(summary.table)))
    if summary.retrieval:
        from fasttrack.lib.tables import display_rows

        show(rich_table(display_rows(summary.retrieval), title="retrieval (held-out questions)"))
    if summary.report:
        console.print(f"report: {summary.report}", soft_wrap=True, highlight=False)
    if summary.exports:
        show(rich_table(summary.exports, title="exports"))


@app.command()
def plan(
    config: Annotated[
        str | None, typer.Argument(help="Run config YAML (default: tiny-cpu)")
    ] = None,
    gpu_mem: Annotated[str | None, typer.Option(help="Device memory, e.g. 24GiB")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override KEY=VALUE")] = None,
) -> None:
    """Memory/compute plan of every training stage before any GPU time is spent."""
    from fasttrack.core.config import STAGES
    from fasttrack.core.config_loader import load_config
    from fasttrack.lib.device_info import detect_memory, parse_size
    from fasttrack.lib.preflight import preflight

    try:
        cfg = load_config(config, split_overrides(set_))
        mem = parse_size(gpu_mem) if gpu_mem else None
        preflight(cfg, STAGES)  # before the planner imports torch: bad inputs answer in seconds
        from fasttrack.lib.planner import plan as make_plan
        from fasttrack.lib.planner import render_plan

        if mem is not None:
            device = "--gpu-mem"
        else:
            mem, device = detect_memory()
        console.print(f"device: {device}", soft_wrap=True, highlight=False)
        show(render_plan(make_plan(cfg, mem), mem))
    except ValueError as exc:
        _fail(FastTrackError(f"--gpu-mem {gpu_mem}: {exc}"))
    except FastTrackError as exc:
        _fail(exc)


@app.command()
def deploy(
    name: Annotated[list[str] | None, typer.Option(help="Only these deployments")] = None,
) -> None:
    """Create the `fasttrack` work pool (queues cpu, gpu) and deploy prefect.yaml."""
    from flows.ops import deploy as do_deploy

    try:
        raise typer.Exit(do_deploy(_split(name)))
    except FastTrackError as exc:
        _fail(exc)


@app.command()
def worker(
    queue: Annotated[str, typer.Option(help="Work queue: cpu or gpu")] = "cpu",
    limit: Annotated[int | None, typer.Option(help="Max concurrent flow runs")] = None,
) -> None:
    """Start a process worker on the `fasttrack` pool (runs scheduled/triggered runs)."""
    from flows.ops import worker as start_worker

    try:
        start_worker(queue, limit)
    except FastTrackError as exc:
        _fail(exc)


@app.command()
def zombies() -> None:
    """Create the automation that marks flow runs Crashed when their heartbeats stop."""
    from flows.ops import HEARTBEAT_S, ZOMBIE_AFTER_S, create_zombie_automation

    try:
        automation_id = create_zombie_automation()
    except FastTrackError as exc:
        _fail(exc)
    console.print(
        f"automation {automation_id}: runs with no heartbeat for {ZOMBIE_AFTER_S} s -> Crashed "
        f"(workers started by `fasttrack worker` send one every {HEARTBEAT_S} s)"
    )


# The other commands register themselves on `app` when imported.
from flows import cli_models, cli_server, cli_store, cli_sweep  # noqa: E402, F401

if __name__ == "__main__":
    app()
