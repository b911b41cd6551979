"""The background Prefect API (flows/prefect_server.py): shared by commands started at once,
replaced when dead, never fooled by a stale PID file, stopped by `fasttrack server stop`.

Every test uses its own PREFECT_HOME and stops its server in teardown: no server outlives the
session (the rest of the suite runs with FASTTRACK_PREFECT_SERVER=ephemeral, tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.prefect_server import STATE, _healthy, ensure_server, read_state, running, stop_server

ROOT = Path(__file__).resolve().parents[2]

_ENSURE = """
import sys, time
while time.time() < float(sys.argv[1]):  # both processes check/start in the same ms
    time.sleep(0.001)
from flows.prefect_server import use_local_api
with use_local_api():  # Prefect not imported yet: the URL goes through the environment
    from prefect import flow
    from prefect.settings import PREFECT_API_URL
    print("api", PREFECT_API_URL.value())
    print("flow result", flow(lambda: 42, name="probe")())
"""


def _gone(pid: int) -> bool:
    """Exited (a zombie whose orphaned parent PID 1 does not reap counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return env | {"PREFECT_HOME": str(home), "FASTTRACK_PREFECT_SERVER": "background"}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    home = tmp_path / "prefect-home"
    monkeypatch.setenv("PREFECT_HOME", str(home))
    yield home
    stop_server(home)


def test_two_commands_at_once_share_one_server_then_status_and_stop(home: Path) -> None:
    cmd = [sys.executable, "-c", _ENSURE, str(time.time() + 6)]
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, env=_env(home), text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
        for _ in range(2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=400) for p in procs]
    for proc, (out, errs) in zip(procs, outs, strict=True):
        assert proc.returncode == 0 and "flow result 42" in out, errs[-3000:]
    state = running(home)
    assert state is not None
    assert {line for out, _ in outs for line in out.splitlines() if line.startswith("api")} == {
        f"api {state['url']}"
    }  # both used the one server
    assert len(list(home.glob("*.lock"))) == 1

    cli = [sys.executable, "-m", "flows.cli", "server"]
    shown = subprocess.run([*cli, "status"], cwd=ROOT, env=_env(home), text=True,
                           capture_output=True, timeout=120)  # fmt: skip
    assert shown.returncode == 0 and state["url"] in shown.stdout, shown.stderr
    stopped = subprocess.run([*cli, "stop"], cwd=ROOT, env=_env(home), text=True,
                             capture_output=True, timeout=120)  # fmt: skip
    assert stopped.returncode == 0 and f"stopped pid {state['pid']}" in stopped.stdout
    assert not _healthy(state["url"]) and _gone(state["pid"])
    shown = subprocess.run([*cli, "status"], cwd=ROOT, env=_env(home), text=True,
                           capture_output=True, timeout=120)  # fmt: skip
    assert shown.returncode == 1 and "no background Prefect server" in shown.stdout


def test_dead_server_is_replaced_and_stale_pid_file_never_trusted(home: Path) -> None:
    first = ensure_server(home)
    old = read_state(home)
    assert old is not None and _healthy(first)
    assert ensure_server(home) == first  # alive and healthy: reused, not restarted
    os.killpg(old["pid"], signal.SIGKILL)
    for _ in range(100):  # reap our child so its pid is gone
        if os.waitpid(old["pid"], os.WNOHANG)[0]:
            break
        time.sleep(0.1)
    second = ensure_server(home)
    new = read_state(home)
    assert new is not None and new["pid"] != old["pid"] and _healthy(second)

    # A stale file: a pid that is alive but not a server (a reused pid), a URL whose server is
    # gone. It must be neither used nor killed.
    stop_server(home)
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        stale = {"pid": bystander.pid, "port": new["port"], "url": second}
        (home / STATE).write_text(json.dumps(stale))
        third = ensure_server(home)
        assert _healthy(third) and read_state(home)["pid"] != bystander.pid
        assert bystander.poll() is None  # not ours: left alone
        assert stop_server(home)["pid"] != bystander.pid
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
