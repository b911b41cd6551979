"""Orchestration overhead and cache speed of the pipeline, measured in one process.

    python benchmarks/cache_overhead.py [CONFIG] [--reps 2]

Prints and writes benchmarks/results/cache_overhead.json:
- cold: the Prefect flow on an empty store (every stage runs);
- direct: the same stage functions called in the same order without Prefect (empty store);
  the RAG stage is disabled on both sides: the flow runs it concurrently with training, which
  would make the flow look faster than "overhead" means;
- overhead = cold flow time / direct time (goal <= 1.03); cold/direct alternate per repetition
  so warm-up effects do not favour one side, and the medians are compared;
- warm: the flow again on the filled store (every stage Cached), in-process and as a whole
  `fasttrack run` process (imports + ephemeral API start included).
The ephemeral Prefect API is started once before timing and reported separately.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
ROOT = Path(__file__).resolve().parents[1]
NO_RAG = ["rag.enabled=false"]
sys.path.insert(0, str(ROOT))


def direct(cfg) -> None:
    """The stage functions of flows/pipeline.py, called plainly."""
    from tasks.base import resolve_base
    from tasks.data import prepare_data
    from tasks.dpo import dpo, reference_logps
    from tasks.evaluate import evaluate_model
    from tasks.pack import pack
    from tasks.pretrain import pretrain
    from tasks.sft import sft

    data = prepare_data(cfg)
    base = resolve_base(cfg, data)
    pre = pretrain(cfg, pack(cfg, data, base), base)
    tuned = sft(cfg, pre, data)
    aligned = dpo(cfg, pre, tuned, reference_logps(cfg, pre, tuned, data), data)
    for ref in (base, pre, tuned, aligned):
        evaluate_model(cfg, ref, data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default=str(ROOT / "pipeline_configs/tiny-cpu.yaml"))
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()

    from prefect import flow

    from fasttrack.core.config_loader import load_config
    from flows.pipeline import PipelineParams, pipeline

    t0 = time.perf_counter()
    flow(lambda: None, name="warm-up")()  # starts the ephemeral API once
    api_start = time.perf_counter() - t0

    tmp = Path(tempfile.mkdtemp(prefix="fasttrack-bench-"))
    cold, plain = [], []
    for rep in range(args.reps):
        store = tmp / f"flow{rep}"
        params = PipelineParams(config=args.config, overrides=[f"store={store}", *NO_RAG])
        t0 = time.perf_counter()
        summary = pipeline(params)
        cold.append(time.perf_counter() - t0)
        assert len(summary.executed) == len(summary.steps), "cold run reused something"
        cfg = load_config(args.config, [f"store={tmp / f'direct{rep}'}", *NO_RAG])
        t0 = time.perf_counter()
        direct(cfg)
        plain.append(time.perf_counter() - t0)
        print(f"rep {rep}: cold flow {cold[-1]:.1f}s, direct {plain[-1]:.1f}s", flush=True)

    t0 = time.perf_counter()
    warm_summary = pipeline(params)
    warm = time.perf_counter() - t0
    assert warm_summary.executed == [], warm_summary.executed

    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect-home")}
    cmd = [sys.executable, "-m", "flows.cli", "run", args.config, "--set", f"store={store}"]
    cmd += ["--set", NO_RAG[0]]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)  # migrate the DB
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    warm_cli = time.perf_counter() - t0

    result = {
        "config": os.path.relpath(args.config, ROOT),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "reps": args.reps,
        "cold_flow_s": [round(x, 2) for x in cold],
        "direct_s": [round(x, 2) for x in plain],
        "overhead_ratio": round(statistics.median(cold) / statistics.median(plain), 4),
        "warm_flow_s": round(warm, 2),
        "warm_cli_process_s": round(warm_cli, 2),
        "ephemeral_api_start_s": round(api_start, 2),
        "goal": "overhead_ratio <= 1.03; warm run < 30 s",
    }
    out = ROOT / "benchmarks/results/cache_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
