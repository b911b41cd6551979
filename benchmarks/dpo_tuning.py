"""DPO settings tried on the validation pairs, the chosen one run once on the test pairs.

    python benchmarks/dpo_tuning.py --name v-base --split validation --store /tmp/dpo-store \
        [--set dpo.loss_type=[sigmoid_norm] ...] [--out dpo_tuning_loaded] [--no-run]

Each call runs `fasttrack run` (the default config, or --config) with `evaluate.answers.split`
set to --split plus the given overrides, into one store (data, pretrain, SFT are cached after
the first call), then reads the run's report: per preference pair whether SFT and DPO rank the
chosen answer higher (wins = pairs only DPO gets right, losses = pairs only SFT gets right), the
paired test of pref_accuracy, pref_margin and ROUGE-L (the report's own verdicts), the wall time
of the run and the DPO steps, and the load average. The record is appended to
benchmarks/results/<out>.json under `runs` (a run of the same name is replaced), so the file
holds every setting tried and on which split: tuning reads only validation runs; the test split
is run once, for the setting validation chose.

Why count wins and losses: SFT already ranks most pairs right, so the paired test of accuracy
only sees the discordant pairs; with n of them all won by DPO the two-sided sign test's p is
2 / 2**n (see `discordant_needed`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def discordant_needed(alpha: float = 0.05) -> int:
    """Fewest discordant pairs, all won by one side, whose two-sided sign test reaches alpha."""
    return next(n for n in range(1, 64) if 2 * 0.5**n < alpha)


def pair_counts(sft: list[list[float]], dpo: list[list[float]]) -> dict[str, int]:
    """Per pair, won (1) or lost (0) under SFT and DPO: DPO's wins, losses, and both-right/wrong."""
    if len(sft) != len(dpo):
        raise ValueError(f"sft scored {len(sft)} pairs, dpo {len(dpo)}: not the same rows")
    both = [(int(s[0]), int(d[0])) for s, d in zip(sft, dpo, strict=True)]
    return {
        "pairs": len(both),
        "dpo_wins": sum(s == 0 and d == 1 for s, d in both),
        "dpo_losses": sum(s == 1 and d == 0 for s, d in both),
        "both_right": sum(s == d == 1 for s, d in both),
        "both_wrong": sum(s == d == 0 for s, d in both),
    }


def analyse(store_dir: Path, name: str) -> dict:
    """SFT vs DPO on the run's evaluated rows, from its newest report and evaluate artifacts."""
    from fasttrack.core.store import ArtifactStore
    from fasttrack.core.store_admin import find_report

    store = ArtifactStore(str(store_dir))
    manifest, _ = find_report(store, name)
    summary = manifest["summary"]
    evals = {k.removeprefix("eval:"): v for k, v in manifest["upstream"].items()
             if k.startswith("eval:")}  # fmt: skip
    scores = {m: json.loads((store_dir / "evaluate" / key / "scores.json").read_text())
              for m, key in evals.items() if m in ("sft", "dpo")}  # fmt: skip
    rows = {m: s["preference"]["rows"] for m, s in scores.items()}
    verdicts = {v["metric"]: {k: v[k] for k in ("from_value", "to_value", "p_value", "verdict")}
                for v in summary["verdicts"] if (v["from"], v["to"]) == ("sft", "dpo")}  # fmt: skip
    return {
        "counts": pair_counts(rows["sft"], rows["dpo"]),
        "sft_vs_dpo": {m: verdicts.get(m) for m in ("pref_accuracy", "pref_margin", "rougeL")},
        "eval_keys": {m: evals[m][:12] for m in ("sft", "dpo")},
    }


def step_seconds(stdout: str) -> dict[str, list]:
    """`step -> [state, seconds]` from the run's step table (rows `step  key  executed  12.3`)."""
    out = {}
    for line in stdout.splitlines():
        cells = line.replace("│", " ").split()
        if len(cells) == 4 and cells[2] in ("executed", "cached"):
            try:
                out[cells[0]] = [cells[2], float(cells[3])]
            except ValueError:
                continue
    return out


def run(config: str | None, store: Path, name: str, split: str, sets: list[str]) -> dict:
    overrides = [f"store={store}", f"name={name}", f"evaluate.answers.split={split}", *sets]
    cmd = [sys.executable, "-m", "flows.cli", "run", *([config] if config else [])]
    cmd += [x for s in overrides for x in ("--set", s)]
    home = os.environ.get("PREFECT_HOME") or tempfile.mkdtemp(prefix="dpo-tuning-ph-")
    env = os.environ | {"COLUMNS": "220", "HF_HUB_OFFLINE": "1", "PREFECT_HOME": home}
    load_before = os.getloadavg()
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, timeout=7200)
    wall = round(time.perf_counter() - started, 1)
    if "PREFECT_HOME" not in os.environ:  # the background API this run started: ours to stop
        from flows.prefect_server import stop_server

        stop_server(Path(home))
    if proc.returncode:
        raise SystemExit(f"fasttrack run {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {
        "wall_s": wall,
        "steps": step_seconds(proc.stdout),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="run name (unique per setting and split)")
    parser.add_argument("--split", choices=("validation", "test"), required=True)
    parser.add_argument("--store", default="/tmp/dpo-store", help="one store for every setting")
    parser.add_argument("--config", help="run config (default: the embedded tiny-cpu)")
    parser.add_argument("--set", action="append", default=[], help="config override")
    parser.add_argument("--out", default="dpo_tuning_loaded", help="results file (no .json)")
    parser.add_argument("--no-run", action="store_true", help="only analyse an existing run")
    parser.add_argument("--note", default="", help="why this setting (recorded)")
    a = parser.parse_args()
    store = Path(a.store)
    record: dict = {"name": a.name, "split": a.split, "overrides": a.set, "note": a.note}
    if not a.no_run:
        record |= run(a.config, store, a.name, a.split, a.set)
    record |= analyse(store, a.name)
    out = ROOT / "benchmarks" / "results" / f"{a.out}.json"
    doc = json.loads(out.read_text()) if out.exists() else {"runs": []}
    doc["runs"] = [r for r in doc["runs"] if r["name"] != a.name] + [record]
    n = discordant_needed()
    doc["sign_test_note"] = (
        f"two-sided sign test: {n} discordant pairs all won by DPO give p = "
        f"{2 * 0.5**n:.3f} (the fewest that reach 0.05; {n - 1} give {2 * 0.5 ** (n - 1):.3f})"
    )
    out.write_text(json.dumps(doc, indent=1) + "\n")
    c, v = record["counts"], record["sft_vs_dpo"]
    acc = v["pref_accuracy"] or {}
    print(f"{a.name} [{a.split}] {' '.join(a.set)}: pairs {c['pairs']}, dpo wins {c['dpo_wins']}"
          f" losses {c['dpo_losses']} (both wrong {c['both_wrong']}); pref_accuracy "
          f"{acc.get('from_value')} -> {acc.get('to_value')} p={acc.get('p_value')}; "
          f"margin p={(v['pref_margin'] or {}).get('p_value')}; rougeL "
          f"{(v['rougeL'] or {}).get('from_value')} -> {(v['rougeL'] or {}).get('to_value')} "
          f"p={(v['rougeL'] or {}).get('p_value')}; wall {record.get('wall_s')} s")  # fmt: skip


if __name__ == "__main__":
    main()
