"""Time-to-error of every bad input of docs/errors.md that needs no data scan, through the CLI.

    python benchmarks/preflight.py [--only ID ...]

Each case of tests/e2e/bad_inputs.py (except those found by reading the data, training or
Prefect) runs as a fresh `fasttrack ...` process (the venv's console script), as a user would
type it: imports, config, preflight, error line. Goal: <= 5 s each on 2 CPU cores (issue
#13). Writes
benchmarks/results/preflight.json with the seconds, the exit code and whether the one error
line matched the documented message. A benchmark, not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GOAL_S = 5.0
FASTTRACK = str(Path(sys.executable).parent / "fasttrack")  # the console script a user types
# data cases found by reading rows (a scan) or by a stage inside the flow: not preflight's
SCAN_OR_FLOW = {
    "data-truncated-parquet", "data-latin1-jsonl", "data-utf16-jsonl", "data-invalid-json",
    "data-non-object", "data-csv-ragged", "data-csv-short-row", "data-missing-column",
    "data-wrong-type", "data-unknown-role", "data-10mb-line", "data-empty-after-cleaning",
    "secret-block-missing",
}  # fmt: skip


def main() -> None:
    from tests.conftest import make_tiny_model
    from tests.e2e.bad_inputs import CASES, Ctx

    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    cases = [c for c in CASES if c.id not in SCAN_OR_FLOW and (not args.only or c.id in args.only)]
    results = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "model")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_HOME": f"{tmp}/prefect",
               "COLUMNS": "200"}  # fmt: skip
        for case in cases:
            case_dir = Path(tmp) / case.id
            case_dir.mkdir()
            argv, culprit = case.make(Ctx(tmp=case_dir, store=case_dir / "store", model=model))
            started = time.perf_counter()
            proc = subprocess.run(
                [FASTTRACK, *argv], cwd=ROOT, env=env,
                capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            seconds = time.perf_counter() - started
            errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
            matched = len(errors) == 1 and bool(
                case.pattern(culprit).fullmatch(errors[0].removeprefix("error: "))
            )
            results.append({"id": case.id, "seconds": round(seconds, 2), "exit": proc.returncode,
                            "message_matches": matched})  # fmt: skip
            flag = "ok  " if seconds <= GOAL_S and proc.returncode == 2 and matched else "SLOW"
            print(f"{flag} {seconds:6.2f} s  exit {proc.returncode}  {case.id}", flush=True)
    worst = max(r["seconds"] for r in results)
    out = {
        "goal_s": GOAL_S,
        "cases": len(results),
        "max_s": worst,
        "all_within_goal": all(r["seconds"] <= GOAL_S for r in results),
        "all_exit_2_one_matching_line": all(
            r["exit"] == 2 and r["message_matches"] for r in results
        ),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            # 1/5/15-min load averages before and after: the machine may be shared, and a
            # loaded machine stretches import times
            "load_avg_before": [round(x, 2) for x in load_before],
            "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "results": results,
    }
    path = ROOT / "benchmarks" / "results" / "preflight.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"max {worst:.2f} s over {len(results)} cases -> {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
