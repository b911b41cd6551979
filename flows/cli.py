"""`fasttrack` command line: run the pipeline, list artifacts.

    fasttrack run                                  # embedded default pipeline_configs/tiny-cpu.yaml
    fasttrack run CONFIG --stages data,pretrain --force pretrain --set pretrain.max_steps=50
    fasttrack plan [CONFIG] [--gpu-mem 24GiB]     # memory/FLOPs per training stage
    fasttrack ask [CONFIG] "question"             # RAG answer with sources
    fasttrack report [RUN|latest] [--store artifacts]   # re-print a past run's report
    fasttrack ls [--store artifacts]
    fasttrack deploy | worker --queue gpu | zombies   # scheduled runs on a Prefect server
    fasttrack verify [--store artifacts] [--no-quarantine]   # re-hash every artifact
    fasttrack gc --older-than 7d [--dry-run] [--store artifacts]

Without PREFECT_API_URL the flow runs on Prefect's ephemeral local API; with a server set, the
same command shows up in the Prefect UI.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network here, no noise
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# The ephemeral API server can take >20 s to start on a busy 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

import typer  # noqa: E402
import typer.core  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.table import Table  # noqa: E402

from tasks.errors import FastTrackError  # noqa: E402

console = Console()
err = Console(stderr=True)


def show(renderable: Any, to: Console | None = None) -> None:
    """Print a table whole: on a terminal rich fits it to the window; piped (a log file, CI)
    rich would cut it to 80 columns (`mod… per…`), so it gets the width it needs unless
    COLUMNS says otherwise."""
    from rich.measure import Measurement

    to = to or console
    if to.is_terminal or os.environ.get("COLUMNS"):
        to.print(renderable)
        return
    need = Measurement.get(to, to.options.update_width(100_000), renderable).maximum
    old = to.width
    to.width = max(need, old)  # print(width=) is capped at the console's width
    try:
        to.print(renderable)
    finally:
        to.width = old


class _OneLineUsageErrors(typer.core.TyperGroup):
    """Usage errors (unknown option or command, missing argument) as one `error:` line like
    every other user error, instead of typer's usage + help hint + boxed panel."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.Abort:
            code = 1
        except typer.TyperException as exc:  # typer's (vendored) click usage errors
            code = getattr(exc, "exit_code", 2)
            if type(exc).__name__ != "NoArgsIsHelpError":  # that one has printed the help
                ctx = getattr(exc, "ctx", None)
                # `fasttrack run`, also under `python -m flows.cli` or a test runner
                where = " ".join(["fasttrack", *ctx.command_path.split()[1:]]) + ": " if ctx else ""
                line = escape(where + exc.format_message())
                err.print(f"[bold red]error:[/] {line}", highlight=False, soft_wrap=True)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineUsageErrors,
    add_completion=False,
    no_args_is_help=True,
    help=__doc__.split("\n")[0],
)


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


class _HideUserErrorTracebacks(logging.Filter):
    """Prefect logs a failed task/flow with a traceback, then twice more in "Finished in state
    Failed(... DataError: <message>)" lines; for an input error the CLI's one `error:` line is
    the whole story, so those records are dropped from the console (the API still gets them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], FastTrackError):
            return False
        text = record.getMessage()
        return not any(f"{name}: " in text or f"{name}(" in text for name in _user_errors())


def _user_errors() -> set[str]:
    todo, names = [FastTrackError], set()
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo += cls.__subclasses__()
    return names


def _quiet_prefect_tracebacks() -> None:
    """Filter Prefect's console handlers (on the root logger and `prefect.*`), not the API
    handlers: the Prefect UI keeps the failure's full log."""
    flt = _HideUserErrorTracebacks()
    for name in ["", *logging.root.manager.loggerDict]:
        if name == "" or name.startswith("prefect"):
            for handler in logging.getLogger(name).handlers:
                console_handler = isinstance(handler, logging.StreamHandler)
                if console_handler and type(handler).__module__.startswith("prefect"):
                    handler.addFilter(flt)


def _fail(exc: Exception) -> None:
    """One `error:` line per problem (a config can have several), no traceback, exit 2."""
    for line in str(exc).splitlines() or [type(exc).__name__]:
        err.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


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
    from tasks.config import load_config

    try:
        cfg = load_config(config, _split(set_))  # fail fast, before Prefect starts
        from tasks.config import STAGES
        from tasks.preflight import preflight

        # before importing the flow (Prefect + every stage's libraries: most of a minute on
        # a busy 2-core machine, benchmarks/results/preflight.json)
        preflight(cfg, _split(stages) or list(STAGES))
        from flows.pipeline import AVAILABLE, PipelineParams, check_params, pipeline

        params = PipelineParams(
            config=config,
            stages=_split(stages) or list(AVAILABLE),
            overrides=_split(set_),
            force=_split(force),
        )
        check_params(params)
    except FastTrackError as exc:
        _fail(exc)
    if not verbose:
        _quiet_prefect_tracebacks()
    from flows.progress_view import training_progress

    try:
        start_ephemeral_api()
        with training_progress(err):
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
        show(metrics_table(summary.table))
    if summary.retrieval:
        show(metrics_table(summary.retrieval, title="retrieval (held-out questions)"))
    if summary.report:
        console.print(f"report: {summary.report}", soft_wrap=True, highlight=False)


@app.command()
def plan(
    config: Annotated[
        str | None, typer.Argument(help="Run config YAML (default: tiny-cpu)")
    ] = None,
    gpu_mem: Annotated[str | None, typer.Option(help="Device memory, e.g. 24GiB")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override KEY=VALUE")] = None,
) -> None:
    """Memory/compute plan of every training stage before any GPU time is spent."""
    from tasks.config import STAGES, load_config
    from tasks.device_info import detect_memory
    from tasks.planner import parse_size, render_plan
    from tasks.planner import plan as make_plan
    from tasks.preflight import preflight

    try:
        cfg = load_config(config, _split(set_))
        preflight(cfg, STAGES)
        if gpu_mem:
            mem, device = parse_size(gpu_mem), "--gpu-mem"
        else:
            mem, device = detect_memory()
        console.print(f"device: {device}", soft_wrap=True, highlight=False)
        show(render_plan(make_plan(cfg, mem), mem))
    except ValueError as exc:
        _fail(FastTrackError(f"--gpu-mem {gpu_mem}: {exc}"))
    except FastTrackError as exc:
        _fail(exc)


@app.command()
def ask(
    args: Annotated[
        list[str], typer.Argument(help='[CONFIG] "question"', metavar="[CONFIG] QUESTION")
    ],
    k: Annotated[int | None, typer.Option(help="Chunks to retrieve (default: rag.top_k)")] = None,
    mode: Annotated[str | None, typer.Option(help="dense | bm25 | hybrid")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override KEY=VALUE")] = None,
) -> None:
    """Answer from the run's RAG index with its newest model (DPO > SFT > pretrain)."""
    from tasks.ask import answer
    from tasks.config import load_config

    if len(args) > 2:
        _fail(FastTrackError('ask: expected [CONFIG] "question" (quote the question)'))
    config, question = (None, args[0]) if len(args) == 1 else args
    try:
        cfg = load_config(config, _split(set_))
        result = answer(cfg, question, k=k, mode=mode)
    except FastTrackError as exc:
        _fail(exc)
    text = escape(result.text) if result.text else "[dim](the model produced no text)[/]"
    console.print(f"[bold]{result.model_stage}[/] ({result.model_key}): {text}")
    sources = Table(title=f"sources ({result.mode})")
    for col in ("#", "title", "section", "score"):
        sources.add_column(col)
    for hit in result.hits:
        sources.add_row(str(hit.rank), hit.title, hit.section or "", f"{hit.score:.3f}")
    show(sources)


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


def metrics_table(rows: list[dict], title: str = "evaluation (held-out data)") -> Table:
    table = Table(title=title)
    for col in rows[0]:
        left = col in ("model", "eval_key", "retrieval", "small_n")
        table.add_column(col, justify="left" if left else "right")
    for row in rows:
        table.add_row(*(_fmt(v) for v in row.values()))
    return table


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.1f}"
    return "-" if value is None else str(value)


@app.command()
def report(
    run: Annotated[str, typer.Argument(help="Run (config) name, or latest")] = "latest",
    store: Annotated[str, typer.Option(help="Store path or fsspec URL")] = "artifacts",
) -> None:
    """Re-print the report of a past run from the store."""
    from rich.markdown import Markdown

    from tasks.run_report import find_report
    from tasks.store import ArtifactStore

    try:
        manifest, path = find_report(ArtifactStore(store), run)
    except FastTrackError as exc:
        _fail(exc)
    key, when = manifest["key"][:12], manifest["created_at"]
    console.print(f"[dim]report {key} of {manifest.get('run')}, {when}: {path}[/]")
    console.print(Markdown(path.read_text()))


@app.command("ls")
def list_artifacts(
    store: Annotated[str, typer.Option(help="Store path or fsspec URL")] = "artifacts",
) -> None:
    """List the artifacts in a store: stage, key, size, created, metrics."""
    from tasks.store import ArtifactStore

    table = Table(title=f"artifacts in {store}")
    for col in ("stage", "key", "size", "created", "metrics"):
        table.add_column(col)
    for m in ArtifactStore(store).manifests():
        size = sum(f["size"] for f in m["files"])
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in list(m.get("metrics", {}).items())[:4])
        table.add_row(m["stage"], m["key"][:12], _human(size), m["created_at"], shown)
    show(table)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def start_ephemeral_api() -> None:
    """Start Prefect's ephemeral API server (no PREFECT_API_URL) holding a lock in PREFECT_HOME.

    Each process without a server starts its own ephemeral API on the SQLite DB in PREFECT_HOME,
    and the server migrates the DB on startup: two `fasttrack run`s started together race on
    that migration (e.g. "duplicate column name", a server that dies and a run that hangs or
    fails). Holding a file lock from start until the server answers /health serialises the
    migrations; the second server then finds the schema current. Prefect reuses this server
    instance for the flow run (it is a per-process singleton).
    """
    from filelock import FileLock
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME

    if PREFECT_API_URL.value():
        return
    home = Path(PREFECT_HOME.value()).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    with FileLock(str(home / "fasttrack-ephemeral-start.lock")):
        SubprocessASGIServer().start()


@app.command()
def verify(
    store: Annotated[str, typer.Option(help="Store path or fsspec URL")] = "artifacts",
    quarantine: Annotated[
        bool, typer.Option(help="Move corrupt artifacts under <store>/quarantine/ (default)")
    ] = True,
) -> None:
    """Re-hash every file of every artifact; exit 1 if any is corrupt.

    Corrupt artifacts are quarantined by default: a move (never a delete) that any run would do
    on its next lookup anyway, and that stops other readers (ask, report, another host) from
    using bad bytes. `--no-quarantine` only reports.
    """
    from tasks.store import ArtifactStore
    from tasks.store_admin import verify_all

    checked, findings = verify_all(ArtifactStore(store), fix=quarantine)
    for f in findings:
        where = f" -> quarantined to {f.quarantined_to}" if f.quarantined_to else ""
        err.print(f"[bold red]corrupt:[/] {f.stage}/{f.key}: {escape('; '.join(f.problems))}"
                  f"{escape(where)}", highlight=False, soft_wrap=True)  # fmt: skip
    console.print(f"verified {checked} artifact(s) in {store}: {len(findings)} corrupt")
    if findings:
        raise typer.Exit(1)


@app.command("gc")
def collect_garbage(
    older_than: Annotated[str, typer.Option(help="Age, e.g. 7d, 12h, 30m")] = "7d",
    dry_run: Annotated[bool, typer.Option(help="Only list what would be removed")] = False,
    store: Annotated[str, typer.Option(help="Store path or fsspec URL")] = "artifacts",
) -> None:
    """Remove unreferenced artifacts not used for --older-than (see tasks/store_admin.py):
    promoted models, each run's newest report and their upstream artifacts are always kept."""
    from tasks.store import ArtifactStore
    from tasks.store_admin import gc, parse_age

    try:
        age = parse_age(older_than)
    except FastTrackError as exc:
        _fail(exc)
    result = gc(ArtifactStore(store), age, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for stage, key, size in result.removed:
        console.print(f"{verb} {stage}/{key} ({_human(size)})")
    for path in result.work_dirs:
        console.print(f"{verb} work dir {path}")
    for busy in result.busy:
        console.print(f"skipped {busy}: in use (locked)")
    console.print(f"{verb} {len(result.removed)} artifact(s), {_human(result.freed)}; "
                  f"kept {result.kept} referenced")  # fmt: skip


def main() -> None:  # pragma: no cover - console script entry
    sys.exit(app())


if __name__ == "__main__":
    app()
