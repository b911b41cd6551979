"""Wall time of `fasttrack ask --server URL "question"` processes against a warm `fasttrack serve`.

    python -m benchmarks.ask_latency [--config CONFIG] [--reps 7]

Builds (or reuses, when `--config` names a store that holds it) a trained run of the tests' tiny
config, starts `fasttrack serve` on its pretrain model in RAG mode, waits until it answers, asks
once untimed (the server's first request loads the embedder), then times `--reps` whole `ask
--server` processes, as a user runs them: median, p90, and the libraries each process imported
(it should import no Prefect, torch or stage module). The server-side time of one chat request
is timed separately (an in-process HTTP call) so the CLI's own start-up cost is visible.
The load average is recorded before and after: on a shared machine the figures grow with it.
Writes benchmarks/results/ask_latency.json. Goal (issue #15): median <= 3 s on 2 quiet cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What does `base64.b64encode` do?"
WATCH = ["prefect", "torch", "transformers", "tasks", "typer", "rich", "pydantic", "httpx"]
PROBE = """
import sys
from flows.cli import app
try:
    app(sys.argv[1:])
finally:
    print("LOADED", ",".join(m for m in {watch!r} if m in sys.modules))
"""


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "COLUMNS": "200",
            "PREFECT_HOME": str(home), "FASTTRACK_PREFECT_SERVER": "ephemeral"}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_config(tmp: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.conftest import tiny_config_dict, write_config

    return write_config(tmp / "tiny.yaml", tiny_config_dict(tmp / "store"))


def _wait(url: str, proc: subprocess.Popen, log: Path, limit: float = 900) -> float:
    import httpx

    started = time.perf_counter()
    while time.perf_counter() - started < limit:
        if proc.poll() is not None:
            raise SystemExit(f"fasttrack serve exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"fasttrack serve not healthy in {limit:.0f} s:\n{log.read_text()[-3000:]}")


def ask_once(url: str, home: Path) -> tuple[float, list[str]]:
    cmd = [sys.executable, "-c", PROBE.format(watch=WATCH), "ask", "--server", url, QUESTION]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(home), text=True, capture_output=True,
                          timeout=600)  # fmt: skip
    wall = time.perf_counter() - started
    if proc.returncode != 0 or "sources (server)" not in proc.stdout:
        raise SystemExit(f"ask --server failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    loaded = next(ln for ln in proc.stdout.splitlines() if ln.startswith("LOADED"))
    return round(wall, 3), [m for m in loaded[7:].split(",") if m]


def server_seconds(url: str) -> float:
    """One RAG chat request timed in this process: the server's share of an `ask`."""
    import httpx

    with httpx.Client(base_url=url, timeout=600) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        body = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "rag": True}
        started = time.perf_counter()
        client.post("/v1/chat/completions", json=body).raise_for_status()
        return round(time.perf_counter() - started, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="a run config whose store already holds the run")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fasttrack-ask-"))
    home = tmp / "prefect-home"
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    out: dict = {"machine": machine, "load_avg_before": os.getloadavg(), "question": QUESTION}
    config = Path(args.config).resolve() if args.config else _tiny_config(tmp)
    out["config"] = str(config)
    serve = None
    try:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "flows.cli", "run", str(config)], cwd=ROOT,
                       env=_env(home), check=True, capture_output=True, timeout=3600)  # fmt: skip
        out["run_s"] = round(time.perf_counter() - started, 2)  # build, or all cached
        port, log = _free_port(), tmp / "serve.log"
        cmd = [sys.executable, "-m", "flows.cli", "serve", str(config), "--port", str(port),
               "--model", "pretrain"]  # fmt: skip
        with open(log, "w") as fh:
            serve = subprocess.Popen(cmd, cwd=ROOT, env=_env(home), stdout=fh, stderr=fh,
                                     start_new_session=True)  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        out["serve_start_s"] = round(_wait(url, serve, log), 2)
        out["first_ask"] = ask_once(url, home)  # untimed warm-up: the embedder loads
        out["server_request_s"] = server_seconds(url)
        runs = [ask_once(url, home) for _ in range(args.reps)]
        walls = sorted(r[0] for r in runs)
        out["ask"] = {
            "wall_s": [r[0] for r in runs],
            "median_s": round(statistics.median(walls), 3),
            "p90_s": walls[min(len(walls) - 1, round(0.9 * (len(walls) - 1)))],
            "imported": runs[-1][1],
        }
    finally:
        if serve is not None:
            os.killpg(serve.pid, signal.SIGTERM)
            serve.wait(timeout=120)
        out["load_avg_after"] = os.getloadavg()
        shutil.rmtree(tmp, ignore_errors=True)
    out["goal"] = "ask median <= 3 s against a warm server on 2 quiet cores"
    quiet = max(out["load_avg_before"][0], out["load_avg_after"][0]) <= os.cpu_count()
    out["machine_state"] = "quiet" if quiet else "loaded (figures grow with the load average)"
    text = json.dumps(out, indent=2)
    print(text)
    (ROOT / "benchmarks" / "results" / "ask_latency.json").write_text(text + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
