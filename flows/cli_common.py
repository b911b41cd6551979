"""What every `fasttrack` command shares: the Typer app, output that stays readable when piped,
one-line errors, and the ephemeral Prefect API."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network here, no noise
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# The ephemeral API server can take >20 s to start on a busy 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

import typer  # noqa: E402
import typer.core  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.table import Table  # noqa: E402

from fasttrack.core.errors import FastTrackError  # noqa: E402

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
    help="`fasttrack` command line: run the pipeline, serve and export its models, keep the store.",
)


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


_NEXT_KEY = re.compile(r"\s*[A-Za-z_][\w.-]*\s*=")


def split_overrides(values: list[str] | None) -> list[str]:
    """`--set` items: one KEY=VALUE each, and `a=1,b=2` as two; a comma splits only at bracket
    depth 0 and before another `key=`, so YAML values keep theirs (`export.formats=[merged,
    gguf-f16]`, `data.sources[0].path=a,b.txt`)."""
    out: list[str] = []
    for item in values or []:
        depth, start = 0, 0
        for i, ch in enumerate(item):
            depth += (ch in "[{") - (ch in "]}")
            if ch == "," and depth <= 0 and _NEXT_KEY.match(item, i + 1):
                out.append(item[start:i])
                start = i + 1
        out.append(item[start:])
    return [v.strip() for v in out if v.strip()]


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


def rich_table(rows: list[dict], title: str = "evaluation (held-out data)") -> Table:
    table = Table(title=title)
    for col in rows[0]:
        left = col in ("model", "eval_key", "retrieval", "small_n", "format", "export_key")
        table.add_column(col, justify="left" if left else "right")
    for row in rows:
        table.add_row(*(_fmt(v) for v in row.values()))
    return table


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.1f}"
    return "-" if value is None else str(value)


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
