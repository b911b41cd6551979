"""Wall time of a fully cached `fasttrack run` (0 steps executed), as a user runs it.

    python benchmarks/cached_run.py [--baseline GIT_REV] [--reps 3] [--config C --store S]

Builds a store once with the default config (training steps cut to 2: a cached run's cost does
not depend on them, only on the 14 steps it looks up), then times whole `fasttrack run`
processes on it:
- baseline: the code of GIT_REV (default: the merge base with main) on the same store, with its
  per-process ephemeral Prefect API;
- ephemeral: this code with FASTTRACK_PREFECT_SERVER=ephemeral (lazy imports only);
- background_first: this code, the background server not yet running (it starts it);
- background_warm: later commands reusing that server (the goal: <= 5 s on 2 quiet cores).
Each process reports which ML libraries it imported. The load average is recorded: on a shared
machine the absolute figures grow with it, the ratios much less.
Writes benchmarks/results/cached_run.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "pipeline_configs" / "tiny-cpu.yaml"
SHORT = ["pretrain.max_steps=2", "sft.max_steps=2", "dpo.max_steps=2"]
HEAVY = ["torch", "transformers", "trl", "peft", "datasets", "sentence_transformers", "faiss"]
PROBE = """
import sys, runpy
sys.argv = ["fasttrack", *sys.argv[1:]]
try:
    runpy.run_module("flows.cli", run_name="__main__")
finally:
    print("HEAVY", ",".join(m for m in {heavy!r} if m in sys.modules))
"""


def fasttrack_run(code: Path, store: Path, home: Path, mode: str) -> tuple[float, list[str], str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(home), "FASTTRACK_PREFECT_SERVER": mode, "COLUMNS": "200",
            "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1"}  # fmt: skip
    args = [
        "run",
        str(CONFIG),
        "--set",
        f"store={store}",
        *[a for s in SHORT for a in ("--set", s)],
    ]
    cmd = [sys.executable, "-c", PROBE.format(heavy=HEAVY), *args]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=code, env=env, text=True, capture_output=True, timeout=3600)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"fasttrack run failed ({code}):\n{proc.stderr[-3000:]}")
    heavy = next(ln for ln in proc.stdout.splitlines() if ln.startswith("HEAVY"))
    executed = next(ln for ln in proc.stdout.splitlines() if "step(s) executed" in ln).strip()
    return round(wall, 2), [m for m in heavy[6:].split(",") if m], executed


def main() -> None:
    global CONFIG, SHORT
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default=None, help="git rev (default: merge-base main)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--config", default=str(CONFIG), help="run config (default tiny-cpu)")
    parser.add_argument("--store", help="a store already holding the run (default: build one)")
    args = parser.parse_args()
    if args.config != str(CONFIG):  # another config: its own step counts
        CONFIG, SHORT = Path(args.config).resolve(), []
    rev = (
        args.baseline
        or subprocess.check_output(
            ["git", "merge-base", "HEAD", "main"], cwd=ROOT, text=True
        ).strip()
    )
    tmp = Path(tempfile.mkdtemp(prefix="fasttrack-cached-"))
    base_code = tmp / "baseline"
    base_code.mkdir()
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(base_code)], input=archive.stdout, check=True)
    store = Path(args.store).resolve() if args.store else tmp / "store"
    from flows.prefect_server import stop_server

    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    out: dict = {"config": str(CONFIG), "overrides": SHORT, "machine": machine,
                 "baseline_rev": rev[:12], "load_avg_before": os.getloadavg()}  # fmt: skip
    try:
        t, _, executed = fasttrack_run(ROOT, store, tmp / "ph-build", "ephemeral")
        out["build_s"], out["build"] = t, executed
        variants = {  # (code, PREFECT_HOME, mode): each home kept, as a user's is
            "baseline": (base_code, tmp / "ph-base", "ephemeral"),
            "ephemeral": (ROOT, tmp / "ph-eph", "ephemeral"),
            "background_warm": (ROOT, tmp / "ph-bg", "background"),
        }
        out["baseline_first"] = fasttrack_run(base_code, store, tmp / "ph-base", "ephemeral")
        fasttrack_run(ROOT, store, tmp / "ph-eph", "ephemeral")  # its DB created, untimed
        out["background_first"] = fasttrack_run(ROOT, store, tmp / "ph-bg", "background")
        runs: dict[str, list] = {name: [] for name in variants}
        for _ in range(args.reps):  # interleaved, so load changes hit every variant alike
            for name, (code, home, mode) in variants.items():
                runs[name].append(fasttrack_run(code, store, home, mode))
        for name, results in runs.items():
            out[name] = {
                "wall_s": [r[0] for r in results],
                "median_s": statistics.median(r[0] for r in results),
                "heavy_imports": results[-1][1],
                "executed": results[-1][2],
            }
        out["speedup_vs_baseline"] = round(
            out["baseline"]["median_s"] / out["background_warm"]["median_s"], 2
        )
    finally:
        stop_server(tmp / "ph-bg")
        out["load_avg_after"] = os.getloadavg()
        shutil.rmtree(tmp, ignore_errors=True)
    out["goal"] = "background_warm median <= 5 s on 2 quiet cores, 0 steps executed"
    quiet = max(out["load_avg_before"][0], out["load_avg_after"][0]) <= os.cpu_count()
    out["machine_state"] = "quiet" if quiet else "loaded (figures grow with the load average)"
    text = json.dumps(out, indent=2)
    print(text)
    (ROOT / "benchmarks" / "results" / "cached_run.json").write_text(text + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
