"""Training in a child process: results, errors, crashes, timeouts and orphans.

The functions run in the child are defined here at module level, so the child imports this
module by name (pickle by reference), exactly as it imports a stage's build function.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fasttrack.core.errors import DataError
from fasttrack.core.isolation import ChildCrashed, StageTimeout, run_isolated
from fasttrack.core.progress import LISTENERS, ProgressReporter

ROOT = Path(__file__).resolve().parents[2]


def add(a: int, b: int) -> dict:
    return {"sum": a + b, "pid": os.getpid()}


def fail_user() -> None:
    raise DataError("data.jsonl:3: not an object")


def fail_bug() -> None:
    raise KeyError("boom")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def sleep_forever(pid_file: str) -> None:
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(600)


def report(stage: str) -> str:
    logging.getLogger("fasttrack").info("%s: hello from the child", stage)
    ProgressReporter(stage).update(3, 4, {"loss": 1.5})
    print("stray print must not break the event stream")
    return "done"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie of ours is dead for our purpose
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


def wait_gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_result_comes_back_from_another_process():
    out = run_isolated(add, 2, 3, stage="unit")
    assert out["sum"] == 5 and out["pid"] != os.getpid()


def test_user_error_keeps_its_type_and_message():
    with pytest.raises(DataError, match="data.jsonl:3: not an object"):
        run_isolated(fail_user, stage="unit")


def test_bug_keeps_its_type_and_child_traceback():
    with pytest.raises(KeyError) as info:
        run_isolated(fail_bug, stage="unit")
    assert any("fail_bug" in note for note in info.value.__notes__)


def test_killed_child_is_a_retryable_crash():
    with pytest.raises(ChildCrashed, match="signal 9"):
        run_isolated(die, stage="unit")


def test_timeout_stops_the_child(tmp_path):
    pid_file = tmp_path / "pid"
    with pytest.raises(StageTimeout, match="unit: stopped after the timeout"):
        run_isolated(sleep_forever, str(pid_file), stage="unit", timeout_s=8)
    assert wait_gone(int(pid_file.read_text()), 10)


def test_logs_and_progress_reach_the_parent(caplog):
    seen = []
    LISTENERS.append(lambda *event: seen.append(event))
    try:
        with caplog.at_level(logging.INFO, logger="fasttrack"):
            assert run_isolated(report, "sft", stage="sft") == "done"
    finally:
        LISTENERS.clear()
    assert ("sft", 3, 4, {"loss": 1.5}) in seen
    assert "sft: hello from the child" in caplog.text


def test_child_dies_with_a_sigkilled_parent(tmp_path):
    pid_file = tmp_path / "pid"
    parent = textwrap.dedent(f"""
        from tests.unit.test_isolation import sleep_forever
        from fasttrack.core.isolation import run_isolated
        run_isolated(sleep_forever, {str(pid_file)!r}, stage="unit")
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent], cwd=ROOT)
    deadline = time.monotonic() + 300  # the first child waits for the zygote's preload
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    child = int(pid_file.read_text())
    proc.kill()  # no finally, no cleanup: only the kernel and the watchdog can help
    proc.wait()
    assert wait_gone(child, 5)


def test_prefect_task_timeout_interrupts_the_wait(tmp_path, prefect_harness):
    from prefect import flow, task

    pid_file = tmp_path / "pid"

    @task(timeout_seconds=10)
    def train() -> None:
        run_isolated(sleep_forever, str(pid_file), stage="unit")

    @flow
    def f() -> None:
        train()

    state = f(return_state=True)
    assert state.is_failed()
    assert wait_gone(int(pid_file.read_text()), 15)


def preloaded() -> dict:
    return {"torch": "torch" in sys.modules, "ppid": os.getppid(), "pgid": os.getpgid(0),
            "pid": os.getpid(), "env": os.environ.get("FASTTRACK_TEST_CHILD_ENV"),
            "cwd": os.getcwd(), "hf_home": os.environ.get("HF_HOME")}  # fmt: skip


def test_child_is_forked_from_the_preloaded_zygote_in_its_own_group(monkeypatch, tmp_path):
    """The child starts with torch & co. already imported (no ~20 s of imports per stage), in
    its own process group, with the environment of this call, not the zygote's."""
    from fasttrack.core.forkserver import Zygote

    monkeypatch.setenv("FASTTRACK_TEST_CHILD_ENV", "first")
    first = run_isolated(preloaded, stage="t")
    monkeypatch.setenv("FASTTRACK_TEST_CHILD_ENV", "second")
    second = run_isolated(preloaded, stage="t")
    zygote = Zygote.get().proc.pid
    for got, env in ((first, "first"), (second, "second")):
        assert got["torch"] and got["ppid"] == zygote and got["pgid"] == got["pid"]
        assert got["env"] == env
    assert first["pid"] != second["pid"]

    monkeypatch.setenv("HF_HOME", str(tmp_path))  # read by the libraries at import: new zygote
    third = run_isolated(preloaded, stage="t")
    assert third["hf_home"] == str(tmp_path) and third["ppid"] == Zygote.get().proc.pid != zygote

    monkeypatch.setenv("FASTTRACK_FORKSERVER", "0")  # opt-out: a fresh interpreter
    fresh = run_isolated(preloaded, stage="t")
    assert not fresh["torch"] and fresh["ppid"] == os.getpid()

    monkeypatch.setenv("FASTTRACK_FORKSERVER", "1")
    monkeypatch.chdir(tmp_path)  # the child works where the parent does, not the zygote
    assert run_isolated(preloaded, stage="t")["cwd"] == str(tmp_path)


def test_prestarted_zygote_is_the_one_children_fork_from(tmp_path):
    """`prestart_children` on a fresh store starts the fork server without waiting for it; the
    first isolated child then forks from that very zygote (not a replacement started because
    its environment differs). A store with artifacts, or no isolation, starts nothing."""
    from fasttrack.core.config_loader import load_config
    from fasttrack.core.forkserver import Zygote
    from fasttrack.lib.training import prestart_children

    cfg = load_config(None, [f"store={tmp_path / 'store'}"])
    before = Zygote._instance  # an earlier test's zygote is reused, as a run reuses its own
    assert not prestart_children(cfg, ["data", "rag"])  # nothing to train
    assert not prestart_children(cfg.model_copy(update={"compute": cfg.compute.model_copy(
        update={"isolate": False})}), ["pretrain"])  # fmt: skip
    assert Zygote._instance is before
    assert prestart_children(cfg, ["data", "pretrain"])
    started = Zygote._instance
    assert started is not None
    if before is None:
        assert not started.ready  # returned before the imports finished
    child = run_isolated(preloaded, stage="t")
    assert child["torch"] and child["ppid"] == started.proc.pid and Zygote._instance is started

    (tmp_path / "store" / "data" / "k").mkdir(parents=True)
    (tmp_path / "store" / "data" / "k" / "manifest.json").write_text("{}")
    assert not prestart_children(cfg, ["pretrain"])  # may be cached: no imports paid for it


def churn_faults() -> dict:
    """Minor page faults of 30 allocate-fill-free cycles of a 40 MB buffer (a training step's
    logits): glibc's defaults map and unmap it each time, the training tunables reuse it."""
    import resource

    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(30):
        buf = bytearray(40_000_000)
        del buf
    return {"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start,
            "tunables": os.environ.get("GLIBC_TUNABLES")}  # fmt: skip


def test_training_children_reuse_freed_memory(monkeypatch):
    """Forked and fresh training children run with fasttrack/core/malloc.py's tunables, so a
    buffer freed at the end of a step is reused, not faulted in again page by page; with
    FASTTRACK_MALLOC_TUNING=0 they get glibc's defaults (~10k faults per cycle)."""
    from fasttrack.core import malloc

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    forked = run_isolated(churn_faults, stage="t")
    monkeypatch.setenv("FASTTRACK_FORKSERVER", "0")
    fresh = run_isolated(churn_faults, stage="t")
    monkeypatch.setenv(malloc.ENV, "0")
    default = run_isolated(churn_faults, stage="t")
    assert forked["tunables"] == fresh["tunables"] == malloc.TUNABLES
    assert default["tunables"] is None
    assert default["faults"] > 30 * 5000  # each cycle maps 40 MB afresh
    assert forked["faults"] < default["faults"] / 20 and fresh["faults"] < default["faults"] / 20


def test_a_users_glibc_tunables_are_kept():
    from fasttrack.core.malloc import TUNABLES, training_env

    assert training_env({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": TUNABLES}
    mine = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert training_env(mine) == mine
    assert training_env({"FASTTRACK_MALLOC_TUNING": "off"}) == {"FASTTRACK_MALLOC_TUNING": "off"}
