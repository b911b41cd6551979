"""`fasttrack report | ls | verify | gc`: read and keep the artifact store."""

from __future__ import annotations

from typing import Annotated

import typer
import typer.core
from rich.markup import escape
from rich.table import Table

from fasttrack.core.errors import FastTrackError
from flows.cli_common import (
    _fail,
    _fmt,
    _human,
    app,
    console,
    err,
    show,
)


@app.command()
def report(
    run: Annotated[str, typer.Argument(help="Run (config) name, or latest")] = "latest",
    store: Annotated[str, typer.Option(help="Store path or fsspec URL")] = "artifacts",
) -> None:
    """Re-print the report of a past run from the store."""
    from rich.markdown import Markdown

    from fasttrack.core.store import ArtifactStore
    from fasttrack.core.store_admin import find_report

    try:
        manifest, path = find_report(ArtifactStore(store), run)
    except FastTrackError as exc:
        _fail(exc)
    key, when = manifest["key"][:12], manifest["created_at"]
    console.print(f"[dim]report {key} of {manifest.get('run')}, {when}: {path}[/]", soft_wrap=True)
    console.print(Markdown(path.read_text()))


@app.command("ls")
def list_artifacts(
    store: Annotated[str, typer.Option(help="Store path or fsspec URL")] = "artifacts",
) -> None:
    """List the artifacts in a store: stage, key, size, created, metrics."""
    from fasttrack.core.store import ArtifactStore

    table = Table(title=f"artifacts in {store}")
    for col in ("stage", "key", "size", "created", "metrics"):
        table.add_column(col)
    try:
        manifests, broken = ArtifactStore(store).scan()
    except FastTrackError as exc:
        _fail(exc)
    for m in manifests:
        size = sum(f["size"] for f in m["files"])
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in list(m.get("metrics", {}).items())[:4])
        table.add_row(m["stage"], m["key"][:12], _human(size), m["created_at"], shown)
    for b in broken:  # never hidden: `fasttrack verify` names and quarantines them
        what = "[red]SYMLINK (refused)[/]" if b.symlink else "[red]CORRUPT[/]"
        table.add_row(b.stage, b.key[:12], "-", "-", f"{what} {escape(b.problem)}")
    show(table)


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
    from fasttrack.core.store import ArtifactStore
    from fasttrack.core.store_admin import verify_all

    checked, findings = verify_all(ArtifactStore(store), fix=quarantine)
    for f in findings:
        where = f" -> quarantined to {f.quarantined_to}" if f.quarantined_to else ""
        err.print(f"[bold red]corrupt:[/] {f.stage}/{f.key}: {escape('; '.join(f.problems))}"
                  f"{escape(where)}", highlight=False, soft_wrap=True)  # fmt: skip
    console.print(f"verified {checked} artifact(s) in {store}: {len(findings)} corrupt",
                  highlight=False, soft_wrap=True)  # fmt: skip
    if findings:
        raise typer.Exit(1)


@app.command("gc")
def collect_garbage(
    older_than: Annotated[str, typer.Option(help="Age, e.g. 7d, 12h, 30m")] = "7d",
    dry_run: Annotated[bool, typer.Option(help="Only list what would be removed")] = False,
    store: Annotated[str, typer.Option(help="Store path or fsspec URL")] = "artifacts",
) -> None:
    """Remove unreferenced artifacts not used for --older-than (see fasttrack/core/store_admin.py):
    promoted models, each run's newest report and their upstream artifacts are always kept."""
    from fasttrack.core.store import ArtifactStore
    from fasttrack.core.store_admin import gc, parse_age

    try:
        age = parse_age(older_than)
    except FastTrackError as exc:
        _fail(exc)
    try:
        result = gc(ArtifactStore(store), age, dry_run=dry_run)
    except FastTrackError as exc:
        _fail(exc)
    for line in result.corrupt:
        err.print(f"[bold red]corrupt:[/] {escape(line)} (kept; `fasttrack verify` quarantines "
                  "it)", highlight=False, soft_wrap=True)  # fmt: skip
    verb = "would remove" if dry_run else "removed"
    for stage, key, size in result.removed:
        console.print(f"{verb} {stage}/{key} ({_human(size)})", soft_wrap=True)
    for path in result.work_dirs:
        console.print(f"{verb} work dir {path}", highlight=False, soft_wrap=True)
    for busy in result.busy:
        console.print(f"skipped {busy}: in use (locked)", soft_wrap=True)
    console.print(f"{verb} {len(result.removed)} artifact(s), {_human(result.freed)}; "
                  f"kept {result.kept} referenced", soft_wrap=True)  # fmt: skip
