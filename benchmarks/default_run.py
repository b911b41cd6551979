"""The default run as a newcomer meets it: `fasttrack run` on the embedded tiny-cpu config in a
fresh store, then `fasttrack ask "How do I parse a JSON string?"`.

    python benchmarks/default_run.py [--store DIR] [--set KEY=VALUE ...] [--out NAME]

Records the wall time of each command and of each step, the run table (every metric with its
95 % bootstrap interval), the stage-to-stage verdicts (paired test, p-value), the per-mode
retrieval table, the gates and the `ask` output, with the load average before and after: the
figures the README's "What `fasttrack run` does with no arguments" section shows. Expected wall
time on 2 quiet cores: about 4 minutes. Writes benchmarks/results/<out>.json (default:
default_run.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "How do I parse a JSON string?"


def fasttrack(args: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    cmd = [sys.executable, "-m", "flows.cli", *args]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, timeout=3600)
    return round(time.perf_counter() - started, 1), proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", help="store directory (default: a fresh temporary one)")
    parser.add_argument("--set", action="append", default=[], help="config override")
    parser.add_argument("--out", default="default_run", help="results file name (no .json)")
    a = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="default-run-"))
    store = Path(a.store) if a.store else tmp / "store"
    env = os.environ | {"COLUMNS": "220", "HF_HUB_OFFLINE": "1", "PREFECT_HOME": str(tmp / "ph")}
    overrides = [x for s in [f"store={store}", *a.set] for x in ("--set", s)]
    load_before = os.getloadavg()
    run_s, run = fasttrack(["run", *overrides], env)
    ask_s, ask = fasttrack(["ask", QUESTION, *overrides], env)
    load_after = os.getloadavg()
    report = sorted(store.glob("report/*/summary.json"), key=lambda p: p.stat().st_mtime)
    summary = json.loads(report[-1].read_text()) if report else {}
    steps = [line for line in run.stdout.splitlines() if "executed" in line or "cached" in line]
    result = {
        "command": "fasttrack run" + "".join(f" --set {s}" for s in a.set),
        "run_seconds": run_s,
        "run_exit": run.returncode,
        "steps": steps,
        "table": summary.get("table"),
        "verdicts": summary.get("verdicts"),
        "retrieval": summary.get("retrieval"),
        "gates": summary.get("gates"),
        "ask": {
            "question": QUESTION,
            "seconds": ask_s,
            "exit": ask.returncode,
            "stdout": ask.stdout,
            "stderr_tail": ask.stderr[-2000:],
        },  # fmt: skip
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "threads": os.environ.get("OMP_NUM_THREADS", "default"),
    }
    if run.returncode:
        result["run_stderr_tail"] = run.stderr[-4000:]
    out = ROOT / "benchmarks" / "results" / f"{a.out}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{out}: run {run_s}s (exit {run.returncode}), ask {ask_s}s; load {load_before[0]:.1f}"
          f" -> {load_after[0]:.1f}")  # fmt: skip
    if not a.store:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
