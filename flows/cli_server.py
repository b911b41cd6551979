"""`fasttrack server status | stop`: the background Prefect API that `fasttrack` commands share
(flows/prefect_server.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from flows.cli_common import app, console

server_app = typer.Typer(help="The background Prefect API shared by `fasttrack` commands.")
app.add_typer(server_app, name="server")


@server_app.command()
def status() -> None:
    """Show the background server of this PREFECT_HOME (exit 1 when none is running)."""
    from flows.prefect_server import prefect_home, running

    home = prefect_home()
    state = running(home)
    if state is None:
        console.print(f"no background Prefect server for {home}", soft_wrap=True, highlight=False)
        raise typer.Exit(1)
    line = f"running: {state['url']} (pid {state['pid']}, PREFECT_HOME {home})"
    console.print(line, soft_wrap=True, highlight=False)


@server_app.command()
def stop(
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No output")] = False,
) -> None:
    """Stop the background server of this PREFECT_HOME (the next command starts a new one)."""
    from flows.prefect_server import prefect_home, stop_server

    state = stop_server(prefect_home())
    if not quiet:
        said = f"stopped pid {state['pid']} ({state['url']})" if state else "none was running"
        console.print(said, soft_wrap=True, highlight=False)
