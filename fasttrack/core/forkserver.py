"""Training children forked from a preloaded zygote instead of started as fresh interpreters.

Why: a fresh `python -m fasttrack.core.isolation` child spends ~20 s on 2 cores importing torch,
transformers, TRL and peft before its first step, once per training stage. The zygote (one per
flow process, started on the first isolated stage) imports them once; each child is then an
`os.fork()` of it, with the libraries already in memory.

Every guarantee of fasttrack/core/isolation.py is kept:
- own process group: the child calls `setsid()` first, so `killpg(child)` (cancel, timeout,
  Ctrl-C) stops it and whatever it started;
- parent death: the zygote has PR_SET_PDEATHSIG (it dies with the flow process) and so has each
  child (it dies with the zygote), plus the child's watchdog of FASTTRACK_PARENT_PID;
- crash -> retry: the child writes result.pkl exactly as before; no result is a ChildCrashed.

Protocol (a SOCK_SEQPACKET Unix socket, one connection per child): the parent sends
`{"dir", "env"}` with the child's stdout/stderr pipe ends attached (SCM_RIGHTS); the zygote forks
and answers `{"pid"}`, then `{"exit"}` when the child ends (it reaps its children; the parent
cannot). The zygote stays single-threaded so forking it is safe.
Opt out with FASTTRACK_FORKSERVER=0 (a fresh interpreter per child, as before).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from fasttrack.core import malloc

ENV = "FASTTRACK_FORKSERVER"
PRELOAD = ("torch", "transformers", "peft", "trl", "datasets", "accelerate")
# the child's entry point, by name: isolation uses this module, so this one must not import it
ENTRY = "fasttrack.core.isolation:child_main"


def set_pdeathsig() -> None:  # pragma: no cover - runs in a child before exec / after fork
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _entry() -> Any:
    import importlib

    module, _, name = ENTRY.partition(":")
    return getattr(importlib.import_module(module), name)


_MAX = 1 << 20
# Read by the preloaded libraries when they are imported (hub paths and offline mode, thread
# pools, devices): a zygote started under other values is replaced, not forked from.
# GLIBC_TUNABLES and the malloc switch are read when the zygote starts (fasttrack/core/malloc.py).
IMPORT_TIME_ENV = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "OMP_", "MKL_",
                   "CUDA_", "PYTORCH_", "TORCH_", "PYTHONPATH", "GLIBC_", malloc.ENV)  # fmt: skip


def import_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(IMPORT_TIME_ENV)}


def enabled() -> bool:
    return malloc.switched_on(os.environ, ENV)


def prestart() -> None:
    """Start the zygote now, without waiting for its ~20 s of imports: called where a run is
    known to train, so the imports overlap the Prefect API start and the data steps instead of
    delaying the first training stage. Call it from the main thread: PR_SET_PDEATHSIG ties the
    zygote to the thread that started it, and a worker thread may end before the run does."""
    if enabled():
        Zygote.get(wait=False)


class ZygoteChild:
    """A forked child as `run_isolated` uses a Popen: pid, poll(), wait(timeout), returncode."""

    def __init__(self, pid: int, conn: socket.socket):
        self.pid, self.conn, self.returncode = pid, conn, None

    def poll(self) -> int | None:
        return self._read(0.0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._read(timeout)
        if code is None:
            raise subprocess.TimeoutExpired(f"forked child {self.pid}", timeout or 0)
        return code

    def _read(self, timeout: float | None) -> int | None:
        if self.returncode is None and select.select([self.conn], [], [], timeout)[0]:
            msg = self.conn.recv(_MAX)
            self.returncode = json.loads(msg)["exit"] if msg else -signal.SIGKILL  # zygote gone
            self.conn.close()
        return self.returncode


class Zygote:
    """The parent's handle on its zygote process (started on first use, one per process)."""

    _lock = threading.Lock()
    _instance: Zygote | None = None

    def __init__(self) -> None:
        self.env = import_env()

        self.dir = Path(tempfile.mkdtemp(prefix="fasttrack-zygote-"))
        self.path = str(self.dir / "sock")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fasttrack.core.forkserver", self.path],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            env=malloc.training_env(os.environ),  # its forked children train with it
            preexec_fn=set_pdeathsig,  # dies with this process
        )
        self.ready = False  # its preload runs on while the caller goes on (`prestart`)

    def wait_ready(self) -> None:
        """Block until the zygote has imported the libraries and listens."""
        if not self.ready:
            ready = self.proc.stdout.readline() if self.proc.stdout else b""  # after the preload
            if ready.strip() != b"ready":
                code = self.proc.poll()
                raise RuntimeError(f"the training fork server did not start (exit {code})")
            self.ready = True

    @classmethod
    def get(cls, wait: bool = True) -> Zygote:
        """The live zygote of this process (started if there is none); `wait=False` returns
        while it is still importing, so the imports overlap the caller's own work."""
        with cls._lock:
            old = cls._instance
            if old is None or old.proc.poll() is not None or old.env != import_env():
                if old is not None:
                    old.close()
                cls._instance = Zygote()
            if wait:
                cls._instance.wait_ready()
            return cls._instance

    def close(self) -> None:
        """Stop the zygote (its children keep running: they are in their own sessions)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def spawn(self, tmp: Path, env: dict[str, str], stdout: int, stderr: int) -> ZygoteChild:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        conn.connect(self.path)
        request = json.dumps({"dir": str(tmp), "env": env, "cwd": os.getcwd()}).encode()
        socket.send_fds(conn, [request], [stdout, stderr])
        reply = conn.recv(_MAX)
        if not reply:
            conn.close()
            raise RuntimeError("the training fork server closed the connection")
        return ZygoteChild(int(json.loads(reply)["pid"]), conn)


# ---------------------------------------------------------------- the zygote side


def _child(listener: socket.socket, conn: socket.socket, req: dict[str, Any], fds: list[int]):
    """In the forked child: new session, the pipes as stdout/stderr, the request's environment,
    then the usual child entry. Never returns."""
    code = 1
    try:
        os.setsid()  # its own process group: the parent's killpg reaches it and its children
        child_main = _entry()
        set_pdeathsig()  # the zygote is its parent now
        listener.close()
        conn.close()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        for fd in (null, *fds):
            os.close(fd)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        os.environ.clear()
        os.environ.update(req["env"])
        os.chdir(req["cwd"])  # relative paths mean what they meant to the parent
        code = child_main(Path(req["dir"]))
    except BaseException:  # noqa: BLE001 - reported on stderr, then a plain exit code
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def serve(path: str) -> None:
    """The zygote: preload, then fork one child per request and report its exit."""
    import importlib

    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    _entry()  # the child entry's module, preloaded too

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(8)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: dict[int, socket.socket] = {}
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        with contextlib.suppress(InterruptedError):
            readable = select.select([listener, wake_r], [], [])[0]
        if wake_r in readable:
            os.read(wake_r, 4096)
        if listener in readable:
            conn, _ = listener.accept()
            msg, fds, _, _ = socket.recv_fds(conn, _MAX, 2)
            pid = os.fork()
            if pid == 0:
                _child(listener, conn, json.loads(msg), fds)
            for fd in fds:
                os.close(fd)
            conn.send(json.dumps({"pid": pid}).encode())
            children[pid] = conn
        while children:  # reap every child that ended; tell its parent how
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if conn := children.pop(pid, None):
                with contextlib.suppress(OSError):
                    conn.send(json.dumps({"exit": os.waitstatus_to_exitcode(status)}).encode())
                conn.close()


if __name__ == "__main__":
    serve(sys.argv[1])
