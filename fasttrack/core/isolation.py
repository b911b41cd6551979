"""Run a stage's build in a killable child process (training stages).

Why: Prefect cannot interrupt blocking torch code running in a thread, so a flow-run
cancellation, a stage timeout or Ctrl-C would leave training running. The parent only waits in
a Python loop (interruptible by Prefect's timeout/cancel exceptions and by signals) and, whatever
ends the wait, kills the child's whole process group in `finally`. If the parent dies without
running `finally` (SIGKILL), the child dies too: PR_SET_PDEATHSIG plus a watchdog thread that
checks the parent pid (which also covers the ranks of a distributed launch).

Protocol: the parent pickles `(fn, args)` to a private temp dir; the child
(`python -m fasttrack.core.isolation DIR`) runs it and pickles the result or the exception back. The
child's stdout carries JSON events (log records, training progress) that the parent replays
into the Prefect run logger, progress artifact and CLI listeners; stray prints go to stderr,
which is forwarded line by line.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import pickle
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fasttrack.core import forkserver, malloc
from fasttrack.core.errors import FastTrackError

PARENT_ENV = "FASTTRACK_PARENT_PID"


class ChildCrashed(RuntimeError):
    """The child died without a result (killed, OOM, segfault): retryable, training resumes."""


class RankDone(BaseException):
    """Raised on ranks > 0 once their collective work is done: rank 0 alone writes the artifact
    and the result (a BaseException so no `except Exception` in library code swallows it)."""


def rank() -> int:
    """This process's rank under a distributed launch (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


def finish_if_not_rank0() -> None:
    if rank() != 0:
        raise RankDone


class StageTimeout(FastTrackError):
    """The stage ran longer than its configured timeout; the child was stopped."""


_set_pdeathsig = forkserver.set_pdeathsig  # the child dies with its parent


def kill_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the child's process group, then SIGKILL what is left after `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # grandchildren that outlived the leader


def _pump(stream: Any, kind: str, events: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        events.put((kind, line.rstrip("\n")))
    events.put((kind, None))


def run_isolated(
    fn: Callable[..., Any],
    *args: Any,
    stage: str,
    timeout_s: float | None = None,
    launcher: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> Any:
    """`fn(*args)` in a child process; returns its result or raises its exception.

    `launcher` prefixes the command (e.g. `accelerate launch --num_processes 2 -m`); the child
    module then runs on every rank and rank 0 writes the result.
    """
    from fasttrack.core.log import get_logger
    from fasttrack.core.progress import ProgressReporter

    log, reporter = get_logger(), ProgressReporter(stage)
    tmp = Path(tempfile.mkdtemp(prefix=f"fasttrack-{stage}-"))
    (tmp / "call.pkl").write_bytes(pickle.dumps((fn, args)))
    cmd = [*launcher] if launcher else [sys.executable, "-m"]
    cmd += ["fasttrack.core.isolation", str(tmp)]
    child_env = malloc.training_env({**os.environ, **(env or {}), PARENT_ENV: str(os.getpid())})
    if api := _prefect_api_url():  # blocks (HF token, store credentials) load in the child too
        child_env.setdefault("PREFECT_API_URL", api)
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    events: queue.Queue = queue.Queue()
    proc, streams = _start_child(cmd, child_env, tmp, forked=not launcher and forkserver.enabled())
    log.info("%s: training in child process %d", stage, proc.pid)
    for stream, kind in zip(streams, ("event", "stderr"), strict=True):
        threading.Thread(target=_pump, args=(stream, kind, events), daemon=True).start()
    started, open_streams = time.monotonic(), 2
    tail: collections.deque[str] = collections.deque(maxlen=20)  # for the crash message
    try:
        while open_streams or proc.poll() is None:
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                kill_group(proc)
                raise StageTimeout(
                    f"{stage}: stopped after the timeout of {timeout_s / 60:g} min "
                    f"({stage}.timeout_minutes); checkpoints are kept for the next run"
                )
            try:
                kind, line = events.get(timeout=0.2)  # short waits: timeouts/cancel interrupt
            except queue.Empty:
                continue
            if line is None:
                open_streams -= 1
            elif kind == "event":
                _replay(line, log, reporter)
            elif line.strip():
                tail.append(line)
                log.debug("%s child: %s", stage, line)
    finally:
        if proc.poll() is None:
            log.warning("%s: stopping the training child %d", stage, proc.pid)
            kill_group(proc)
    try:
        return _result(tmp, proc.returncode, stage, list(tail))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _start_child(cmd: list[str], env: dict[str, str], tmp: Path, forked: bool) -> tuple[Any, list]:
    """The child and its (stdout, stderr) text streams: forked from the preloaded zygote
    (fasttrack/core/forkserver.py: no ~20 s of imports) or a fresh interpreter (a launcher's
    ranks, FASTTRACK_FORKSERVER=0, or a zygote that cannot start)."""
    if forked:
        try:
            zygote = forkserver.Zygote.get()
        except (OSError, RuntimeError) as exc:
            from fasttrack.core.log import get_logger

            get_logger().warning("training fork server unavailable (%s): a fresh process", exc)
        else:
            (out_r, out_w), (err_r, err_w) = os.pipe(), os.pipe()
            try:
                proc = zygote.spawn(tmp, env, out_w, err_w)
            finally:
                os.close(out_w)
                os.close(err_w)
            return proc, [os.fdopen(out_r, "r"), os.fdopen(err_r, "r")]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: one killpg stops every rank
        preexec_fn=_set_pdeathsig,
    )
    return proc, [proc.stdout, proc.stderr]


def _prefect_api_url() -> str | None:
    """The API this process talks to (a server, the CLI's ephemeral one, a test harness)."""
    if "prefect" not in sys.modules:
        return None
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def _replay(line: str, log: Any, reporter: Any) -> None:
    try:
        event = json.loads(line)
    except ValueError:
        log.info("%s", line)
        return
    if event.get("type") == "progress":
        reporter.update(event["step"], event["total"], event.get("logs") or {})
    elif event.get("type") == "log":
        log.log(event.get("level", logging.INFO), "%s", event.get("msg", ""))


def _result(tmp: Path, returncode: int | None, stage: str, tail: list[str]) -> Any:
    path = tmp / "result.pkl"
    if not path.is_file():
        how = f"signal {-returncode}" if returncode and returncode < 0 else f"exit {returncode}"
        last = "\n".join(tail[-10:])
        raise ChildCrashed(f"{stage}: the training child died ({how}) without a result\n{last}")
    status, value, tb = pickle.loads(path.read_bytes())
    if status == "ok":
        return value
    if isinstance(value, BaseException):
        if not isinstance(value, FastTrackError):
            value.add_note(f"in the {stage} child process:\n{tb}")
        raise value
    raise RuntimeError(f"{stage} child failed:\n{tb}")


# ---------------------------------------------------------------- the child side


class _EventHandler(logging.Handler):
    def __init__(self, emit_event: Callable[[dict[str, Any]], None]):
        super().__init__(logging.INFO)
        self.emit_event = emit_event

    def emit(self, record: logging.LogRecord) -> None:
        self.emit_event({"type": "log", "level": record.levelno, "msg": record.getMessage()})


def _watch_parent(parent: int) -> None:
    """Exit as soon as the parent flow process is gone (covers ranks PDEATHSIG does not)."""
    while True:
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            os._exit(137)
        except PermissionError:
            pass
        time.sleep(0.5)


def child_main(tmp: Path) -> int:
    """Entry of the child (and of every rank under a launcher)."""
    events_out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library prints must not corrupt the event stream
    lock = threading.Lock()

    def emit(event: dict[str, Any]) -> None:
        if rank() == 0:
            with lock:
                events_out.write(json.dumps(event, default=str) + "\n")

    if parent := os.environ.get(PARENT_ENV):
        threading.Thread(target=_watch_parent, args=(int(parent),), daemon=True).start()
    logger = logging.getLogger("fasttrack")
    logger.setLevel(logging.INFO)
    logger.addHandler(_EventHandler(emit))
    logger.propagate = False

    from fasttrack.core.progress import LISTENERS

    LISTENERS.append(
        lambda stage, step, total, logs: emit(
            {"type": "progress", "stage": stage, "step": step, "total": total, "logs": logs}
        )
    )
    fn, args = pickle.loads((tmp / "call.pkl").read_bytes())
    from fasttrack.core.fsdp import enable_fsdp_on_cpu, fsdp_requested

    if fsdp_requested():
        enable_fsdp_on_cpu()  # CPU/gloo ranks: FSDP2 as on GPUs, not a silent DDP fallback
    try:
        result: tuple[str, Any, str] = ("ok", fn(*args), "")
    except RankDone:
        return 0
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        tb = traceback.format_exc()
        try:
            pickle.dumps(exc)
        except Exception:
            exc = RuntimeError(f"{type(exc).__name__}: {exc}")
        result = ("error", exc, tb)
    if rank() == 0:
        part = tmp / f"result.pkl.{os.getpid()}"
        part.write_bytes(pickle.dumps(result))
        part.rename(tmp / "result.pkl")  # whole or absent: a kill mid-write is a crash
    return 0 if result[0] == "ok" else 1


if __name__ == "__main__":
    sys.exit(child_main(Path(sys.argv[1])))
