"""The default run as a newcomer meets it: `fasttrack run` on the embedded tiny-cpu config in a
fresh store, then `fasttrack ask "How do I parse a JSON string?"`.

    python benchmarks/default_run.py [--store DIR] [--set KEY=VALUE ...] [--out NAME]
    python benchmarks/default_run.py --markdown benchmarks/results/default_run.json   # README

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


COLUMNS = ("perplexity", "rougeL", "pref_accuracy", "recall@5")


def _cell(row: dict, col: str) -> str:
    value, ci = row.get(col), (row.get("ci") or {}).get(col)
    if value is None:
        return "–"
    text = f"{value:.4g}"
    return text + (f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "")


def markdown(result: dict) -> str:
    """The README's tables from a results file: metrics with intervals, then the verdicts."""
    lines = ["| model | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for row in result.get("table") or []:
        lines.append(f"| {row['model']} | " + " | ".join(_cell(row, c) for c in COLUMNS) + " |")
    lines += ["", "| from → to | metric | from | to | p | verdict |", "|---|---|---|---|---|---|"]
    for v in result.get("verdicts") or []:
        if v["metric"] in COLUMNS:
            values = f"{v['from_value']:.4g} | {v['to_value']:.4g} | {v['p_value']:.3g}"
            lines.append(f"| {v['from']} → {v['to']} | {v['metric']} | {values} | {v['verdict']} |")
    lines += ["", "| retrieval | recall@1 | recall@5 | recall@10 | mrr |", "|---|---|---|---|---|"]
    for row in result.get("retrieval") or []:
        cells = " | ".join(_cell(row, c) for c in ("recall@1", "recall@5", "recall@10", "mrr"))
        lines.append(f"| {row['retrieval']} | {cells} |")
    return "\n".join(lines)


NO_TEXT = "(the model produced no text)"


def goals(summary: dict, ask: subprocess.CompletedProcess) -> dict:
    """Issue #17's bar for the default run: `ask` prints an answer (not the no-text note) and
    the dpo+rag row beats the dpo row on ROUGE-L with significance (the report's verdict)."""
    first = ask.stdout.splitlines()[0] if ask.stdout.strip() else ""
    answer = first.split(": ", 1)[1].strip() if ": " in first else ""
    rag = next((v for v in summary.get("verdicts") or []
                if v["to"].endswith("+rag") and v["metric"] == "rougeL"), None)  # fmt: skip
    return {
        "ask_answer": answer,
        "ask_answered": ask.returncode == 0 and bool(answer) and answer != NO_TEXT,
        "rag_rougeL_verdict": rag and rag["verdict"],
        "rag_rougeL_p": rag and rag["p_value"],
        "rag_beats_dpo": bool(rag) and rag["verdict"] == "improved",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", help="store directory (default: a fresh temporary one)")
    parser.add_argument("--set", action="append", default=[], help="config override")
    parser.add_argument("--out", default="default_run", help="results file name (no .json)")
    parser.add_argument("--markdown", metavar="JSON", help="print a results file's README tables")
    parser.add_argument("--label", help="how the machine was, e.g. quiet / loaded (recorded)")
    a = parser.parse_args()
    if a.markdown:
        print(markdown(json.loads(Path(a.markdown).read_text())))
        return
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
        "label": a.label,
        "store": "reused" if a.store else "fresh",
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
        "goals": goals(summary, ask),
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
          f" -> {load_after[0]:.1f}; goals {result['goals']}")  # fmt: skip
    sys.path.insert(0, str(ROOT))
    from flows.prefect_server import stop_server

    stop_server(tmp / "ph")  # the background Prefect API the run started on this PREFECT_HOME
    if not a.store:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
