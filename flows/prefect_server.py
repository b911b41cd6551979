"""A local Prefect API started in the background on first use and shared by later commands.

Why: Prefect's ephemeral API is a server started per process (5-15 s on a 2-core machine, most of
a cached `fasttrack run`). This one starts once per `PREFECT_HOME` (same SQLite DB as the
ephemeral API), detached in its own session, and every later `fasttrack` command just checks it.

- State: `PREFECT_HOME/fasttrack-server.json` (pid, port, url). It is trusted only when the pid
  is alive, its command line is this server's, *and* `<url>/health` answers: a stale file (dead
  server, reused pid, port taken by something else) is replaced and never used to kill a
  process that is not ours.
- `PREFECT_HOME/fasttrack-server.lock` (a file lock) is held while checking/starting, so two
  commands starting at once share one server (the second waits and finds it healthy).
- Opt out with `FASTTRACK_PREFECT_SERVER=ephemeral` (a fresh ephemeral API per process, as
  Prefect does by default; the test suite uses it); a set `PREFECT_API_URL` wins over both.
- `fasttrack server status|stop` (flows/cli_server.py) shows and stops it.

Nothing here imports Prefect: a cached run should not pay for it before it needs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

MODE_ENV = "FASTTRACK_PREFECT_SERVER"  # "background" (default) or "ephemeral"
STATE, LOCK, LOG = "fasttrack-server.json", "fasttrack-server.lock", "fasttrack-server.log"
_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
_MARK = "prefect.server.api.server:create_app"  # in the server's command line


def prefect_home() -> Path:
    """PREFECT_HOME as Prefect resolves it (env or the default), without importing Prefect."""
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()


def use_background() -> bool:
    return os.environ.get(MODE_ENV, "background").strip().lower() != "ephemeral"


def _healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (OSError, ValueError):
        return False


def _ours(pid: int) -> bool:
    """Whether `pid` is alive and is a background server (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return _MARK in cmdline


def read_state(home: Path | None = None) -> dict[str, Any] | None:
    try:
        state = json.loads(((home or prefect_home()) / STATE).read_text())
        return state if {"pid", "url"} <= set(state) else None
    except (OSError, ValueError, TypeError):
        return None


def running(home: Path | None = None) -> dict[str, Any] | None:
    """The state of a live, healthy background server of `home`, else None."""
    state = read_state(home)
    if state and _ours(int(state["pid"])) and _healthy(state["url"]):
        return state
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(home: Path, timeout_s: float) -> dict[str, Any]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "0",
           "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}  # fmt: skip
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "uvicorn", "--factory", _MARK, "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "error", "--lifespan", "on"]  # fmt: skip
    with open(home / LOG, "ab") as log:
        proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            start_new_session=True,  # outlives this command; not hit by its Ctrl-C
        )  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while not _healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill(proc.pid)
            from fasttrack.core.errors import FastTrackError

            raise FastTrackError(
                f"the background Prefect server did not start in {timeout_s:g} s "
                f"(log: {home / LOG}); set {MODE_ENV}=ephemeral to use a per-process API"
            )
        time.sleep(0.2)
    state = {"pid": proc.pid, "port": port, "url": url, "started": time.time()}
    tmp = home / f"{STATE}.{os.getpid()}"
    tmp.write_text(json.dumps(state))
    tmp.replace(home / STATE)  # atomic: readers see the old state or the new one
    return state


def _kill(pid: int, grace_s: float = 10.0) -> None:
    """Stop a background server's process group: SIGTERM, then SIGKILL after `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # reap it when we are its parent
            if not Path(f"/proc/{pid}").exists() or not _ours(pid):
                return
            time.sleep(0.1)


def ensure_server(home: Path | None = None, timeout_s: float | None = None) -> str:
    """The URL of this PREFECT_HOME's background server, started (under the lock) if needed."""
    from filelock import FileLock

    home = home or prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    if state := running(home):  # the common case: no lock needed to read it
        return state["url"]
    # a fresh DB is migrated on first start: minutes on a loaded 2-core machine
    timeout = timeout_s or max(180.0, float(os.environ.get(_TIMEOUT_ENV, 0)))
    with FileLock(str(home / LOCK)):
        if state := running(home):  # started by another command while we waited
            return state["url"]
        if (old := read_state(home)) and _ours(int(old["pid"])):
            _kill(int(old["pid"]))  # ours but not answering: replace it
        return _start(home, timeout)["url"]


def stop_server(home: Path | None = None) -> dict[str, Any] | None:
    """Stop this PREFECT_HOME's background server; its former state, or None if none ran."""
    from filelock import FileLock

    home = home or prefect_home()
    if not home.is_dir():
        return None
    with FileLock(str(home / LOCK)):
        state = read_state(home)
        (home / STATE).unlink(missing_ok=True)
        if state and _ours(int(state["pid"])):
            _kill(int(state["pid"]))
            return state
    return None


def use_local_api() -> contextlib.AbstractContextManager[Any]:
    """Point this process at a local Prefect API unless PREFECT_API_URL is set: the background
    server (default), or a per-process ephemeral one (`FASTTRACK_PREFECT_SERVER=ephemeral`).
    A context manager: the API URL is set for its duration."""
    if "prefect" in sys.modules:  # its settings (env, profile) decide
        from prefect.settings import PREFECT_API_URL

        if PREFECT_API_URL.value():
            return contextlib.nullcontext()
    elif os.environ.get("PREFECT_API_URL"):
        return contextlib.nullcontext()
    if not use_background():
        from flows.cli_common import start_ephemeral_api

        start_ephemeral_api()
        return contextlib.nullcontext()
    url = ensure_server()
    if "prefect" not in sys.modules:
        os.environ["PREFECT_API_URL"] = url  # read when Prefect's settings load
        return contextlib.nullcontext()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: url})
