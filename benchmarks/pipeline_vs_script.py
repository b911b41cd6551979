"""The whole default run against the plain script a user would write (issue #15 goal 3).

    python benchmarks/pipeline_vs_script.py [--quick] [--cleanup] [--config YAML] [--set K=V ...]
        [--stages sft] [--threads N]

On the same machine, in one go:
(a) benchmarks/plain_lifecycle.py as a subprocess: data -> pretrain (stock `Trainer`) -> SFT
    (TRL `SFTTrainer` + peft LoRA, 4-bit as the config says) -> DPO (TRL `DPOTrainer`) -> RAG
    (sentence-transformers + faiss), no orchestration, no cache;
(b) `fasttrack run` cold: a fresh store and a fresh PREFECT_HOME.
Both read the same run config (default pipeline_configs/tiny-cpu.yaml, `--set` overrides): data
files, step counts, batch sizes, block/max lengths, eval cadence and eval set sizes, model
architecture, LoRA/4-bit, chunk size/overlap and embedder. The script evaluates as the pipeline
does during training (eval_steps, SFT's eval before training, a final eval), so that work counts
on both sides; the pipeline's `evaluate`/`report`/`export` steps are excluded from its total.
Per stage: wall seconds of both (pipeline data = data + base + pack, dpo = dpo_ref + dpo), the
ratio pipeline/script, training throughput of both, chunks embedded; totals; the load average
before/after. Writes benchmarks/results/pipeline_vs_script.json (`--quick`: ..._quick.json) and
prints the store path, kept for the README default-run table unless `--cleanup`.
`--stages` runs only those stages and what they need on both sides (`sft`: data, pretrain, sft;
no evaluation), `--threads N` gives both sides N torch threads (OMP_NUM_THREADS for the
pipeline's processes). Training throughput is given per wall second and per CPU second of the
training process (all threads): on a shared machine the CPU figure is the one to compare, with
`--threads 1` (two OpenMP threads on two busy cores spin-wait, so their CPU time grows too).
Goal: total ratio <= 1.15, training throughput >= 0.95x the script's. ~12 min on 2 quiet cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "pipeline_configs" / "tiny-cpu.yaml"
QUICK = [  # a smoke test: every stage runs, a few steps each
    "pretrain.max_steps=6", "pretrain.eval_steps=3", "sft.max_steps=4", "sft.eval_steps=2",
    "dpo.max_steps=2", "dpo.eval_steps=2", "sft.logging_steps=2",  # TRL logs num_tokens
]  # fmt: skip
QUICK_STAGES = "data,pretrain,sft,dpo,rag"
NEEDS = {"data": (), "pretrain": ("data",), "sft": ("data", "pretrain"),
         "dpo": ("data", "pretrain", "sft"), "rag": ("data",)}  # fmt: skip
STAGE_STEPS = {  # benchmark stage -> the pipeline steps it covers
    "data": ("data", "base", "pack"),
    "pretrain": ("pretrain",),
    "sft": ("sft",),
    "dpo": ("dpo_ref", "dpo"),
    "rag": ("rag",),
}
NOT_COUNTED = ("evaluate", "report", "export")  # evaluation, excluded from both totals
STEP_ROW = re.compile(
    r"^\W*([\w:+.-]+)\s+\W\s*([0-9a-f]{12})\s+\W\s*(executed|cached)\s+\W\s*([\d.]+)"
)


def load_plan(config: Path, overrides: list[str]) -> dict:
    """Every number the plain script needs, read from the run config the pipeline uses."""
    from fasttrack.core.config_loader import load_config
    from fasttrack.lib.demo import DEMO_DIR
    from fasttrack.lib.embedder import resolve_embedder

    cfg = load_config(str(config), overrides)
    files: dict[str, list[str]] = {"text": [], "alpaca": [], "preference": []}
    for src in cfg.data.sources:
        path = str(DEMO_DIR / f"{src.path[5:]}.jsonl") if src.path.startswith("demo:") else src.path
        if src.format not in files or not path.endswith(".jsonl"):
            raise SystemExit(f"the plain script reads jsonl text/alpaca/preference only: {src}")
        files[src.format].append(path)

    def section(s, *extra: str) -> dict:
        keys = ("max_steps", "per_device_batch_size", "learning_rate", "lr_scheduler", "optimizer",
                "warmup_ratio", "weight_decay", "eval_steps", "logging_steps", *extra)  # fmt: skip
        return {k: getattr(s, k) for k in keys}

    a = cfg.model.architecture
    if cfg.model.name_or_path != "scratch":
        raise SystemExit("the plain script builds the scratch model only")
    return {
        "seed": cfg.seed,
        "split": {"validation": cfg.data.split.validation, "test": cfg.data.split.test},
        "data": {
            "corpus": files["text"],
            "sft": files["alpaca"][0],
            "preference": files["preference"][0],
        },  # fmt: skip
        "tokenizer": cfg.model.tokenizer.model_dump(include={"vocab_size", "min_frequency"}),
        "architecture": a.model_dump(
            include={
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "max_position_embeddings",
                "tie_word_embeddings",
                "rope_theta",
            }
        ),  # fmt: skip
        "pretrain": section(cfg.pretrain, "block_size", "eval_max_blocks"),
        "sft": section(cfg.sft, "max_length", "packing", "completion_only_loss", "eval_max_rows"),
        "dpo": section(cfg.dpo, "beta", "loss_type", "max_length", "eval_max_rows"),
        "lora": cfg.adapter.lora.model_dump(
            include={"r", "lora_alpha", "lora_dropout", "target_modules"}
        ),
        "quantization": cfg.adapter.quantization.model_dump(),
        "rag": {
            "embedder_path": str(resolve_embedder(cfg.rag.embedder)[0]),
            "size_tokens": cfg.rag.chunk.size_tokens,
            "overlap_tokens": cfg.rag.chunk.overlap_tokens,
            "batch_size": cfg.rag.batch_size,
            "pipeline_backend": cfg.rag.embedder_backend,
        },
    }


def env_for(home: Path | None = None, threads: int | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"HF_HUB_OFFLINE": "1", "COLUMNS": "200", "PYTHONPATH": str(ROOT)}
    env |= {"OMP_NUM_THREADS": str(threads)} if threads else {}
    return env | ({"PREFECT_HOME": str(home)} if home else {})


def with_needs(stages: str) -> list[str]:
    """The stages asked for and those they need, in lifecycle order; an unknown one is an error."""
    asked = [s.strip() for s in stages.split(",") if s.strip()]
    if unknown := [s for s in asked if s not in NEEDS]:
        raise SystemExit(f"--stages: unknown {', '.join(unknown)}; known: {', '.join(NEEDS)}")
    wanted = {n for s in asked for n in (s, *NEEDS[s])}
    return [s for s in NEEDS if s in wanted]


def run_script(plan: dict, tmp: Path) -> tuple[float, dict[str, dict]]:
    (tmp / "plan.json").write_text(json.dumps(plan, indent=2))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "plain_lifecycle.py"),
           str(tmp / "plan.json"), str(tmp / "script-out")]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env_for(threads=plan.get("threads")), text=True,
                          capture_output=True, timeout=7200)  # fmt: skip
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"plain script failed:\n{proc.stderr[-4000:]}")
    stages = {}
    for line in proc.stdout.splitlines():
        if line.startswith("STAGE "):
            row = json.loads(line[6:])
            stages[row["stage"]] = row
    return wall, stages


def run_pipeline(
    config: Path, overrides: list[str], tmp: Path, stages: str | None, threads: int | None = None
) -> tuple[float, list[dict]]:
    store = tmp / "store"
    sets = [a for o in [f"store={store}", *overrides] for a in ("--set", o)]
    cmd = [sys.executable, "-m", "flows.cli", "run", str(config), *sets]
    cmd += ["--stages", stages] if stages else []
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env_for(tmp / "prefect-home", threads), text=True,
                          capture_output=True, timeout=7200)  # fmt: skip
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"fasttrack run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    steps = []
    for line in proc.stdout.splitlines():
        if m := STEP_ROW.match(line):
            steps.append({"step": m[1], "status": m[3], "seconds": float(m[4])})
    if not steps:
        raise SystemExit(f"no step table in the output of fasttrack run:\n{proc.stdout[-3000:]}")
    return wall, steps


def manifest(store: Path, stage: str) -> dict:
    found = sorted((store / stage).glob("*/manifest.json"))
    return json.loads(found[-1].read_text()) if found else {}


def sft_tokens(store: Path) -> int:
    """Tokens TRL counted over SFT training (the last `num_tokens` in its log history)."""
    found = sorted((store / "sft").glob("*/log_history.json"))
    history = json.loads(found[-1].read_text()) if found else []
    return max((h.get("num_tokens", 0) for h in history), default=0)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def compare(plan: dict, script: dict, steps: list[dict], pipe_wall: float, store: Path) -> dict:
    seconds = {s["step"]: s["seconds"] for s in steps}
    stages = {}
    for name, covered in STAGE_STEPS.items():
        if name not in script:  # not run (--stages)
            continue
        pipe = round(sum(seconds.get(s, 0.0) for s in covered), 2)
        stages[name] = {"script_s": script[name]["seconds"], "pipeline_s": pipe,
                        "ratio": ratio(pipe, script[name]["seconds"]),
                        "pipeline_steps": {s: seconds.get(s) for s in covered}}  # fmt: skip
    evaluation = sum(v for k, v in seconds.items() if k.split(":")[0] in NOT_COUNTED)
    pipe_total = round(pipe_wall - evaluation, 2)
    script_total = script["total"]["seconds"]

    p, d = plan["pretrain"], plan["dpo"]
    pre_tokens = p["max_steps"] * p["per_device_batch_size"] * p["block_size"]
    pairs = d["max_steps"] * d["per_device_batch_size"]
    amounts = {  # stage -> (unit, script's amount, pipeline's amount)
        "pretrain": ("tokens", pre_tokens, pre_tokens),
        "sft": ("tokens", script.get("sft", {}).get("train_tokens"), sft_tokens(store)),
        "dpo": ("pairs", pairs, pairs),
    }
    throughput = {}
    for stage, (unit, script_amount, pipe_amount) in amounts.items():
        if stage not in script:
            continue
        pipe = manifest(store, stage).get("metrics", {})
        for per, key in (("s", "train_seconds"), ("cpu_s", "train_cpu_seconds")):
            a = per_s(script_amount, script[stage].get(key))
            b = per_s(pipe_amount, pipe.get(key))
            throughput[f"{stage}_{unit}_per_{per}"] = {
                "script": a and round(a, 1), "pipeline": b and round(b, 1), "ratio": ratio(b, a),
                "script_" + key: script[stage].get(key), "pipeline_" + key: pipe.get(key),
            }  # fmt: skip
    return {
        "stages": stages,
        "total": {
            "script_s": script_total,
            "pipeline_s": pipe_total,
            "ratio": ratio(pipe_total, script_total),
            "pipeline_wall_s_incl_evaluation": round(pipe_wall, 2),
            "pipeline_evaluation_s": round(evaluation, 2),
            "script_imports_s": script["imports"]["seconds"],
        },  # fmt: skip
        "throughput": throughput,
        "chunks": {
            "script": script.get("rag", {}).get("chunks"),
            "pipeline": manifest(store, "rag").get("metrics", {}).get("chunks"),
        },  # fmt: skip
        "pipeline_steps": steps,
    }


def per_s(amount: float | None, seconds: float | None) -> float | None:
    return amount / seconds if amount and seconds else None


def show(result: dict) -> None:
    print(f"{'stage':<10}{'script s':>10}{'pipeline s':>12}{'ratio':>8}")
    for name, s in [*result["stages"].items(), ("TOTAL", result["total"])]:
        print(f"{name:<10}{s['script_s']:>10.1f}{s['pipeline_s']:>12.1f}{s['ratio'] or 0:>8.2f}")
    for name, t in result["throughput"].items():
        print(f"{name:<24} script {t['script']}  pipeline {t['pipeline']}  ratio {t['ratio']}")
    print(f"chunks embedded: script {result['chunks']['script']}, "
          f"pipeline {result['chunks']['pipeline']}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--quick", action="store_true", help="a few steps per stage (smoke test)")
    parser.add_argument("--cleanup", action="store_true", help="remove the store afterwards")
    parser.add_argument("--out", default=None, help="result JSON (default benchmarks/results/)")
    parser.add_argument("--label", default="", help="e.g. 'loaded machine' (kept in the JSON)")
    parser.add_argument("--stages", help="only these (and what they need), e.g. sft; no evaluation")
    parser.add_argument("--threads", type=int, help="torch threads on both sides (default torch's)")
    args = parser.parse_args()
    config = Path(args.config).resolve()
    overrides = (QUICK if args.quick else []) + args.overrides
    stages = with_needs(args.stages) if args.stages else None
    plan = load_plan(config, overrides) | {"stages": stages, "threads": args.threads}
    tmp = Path(tempfile.mkdtemp(prefix="fasttrack-vs-script-"))
    out: dict = {
        "label": args.label, "config": str(config.relative_to(ROOT) if config.is_relative_to(ROOT)
                                          else config),
        "overrides": overrides, "quick": args.quick,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                   f"Python {platform.python_version()}",
        "load_avg_before": os.getloadavg(), "stages": stages, "threads": args.threads,
    }  # fmt: skip
    name = "pipeline_vs_script" + ("_quick" if args.quick else "")
    name += f"_{'-'.join(stages)}" if stages else ""
    name += f"_{args.threads}thread" if args.threads else ""
    name += ".json"
    path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / name
    out["goal"] = "total ratio <= 1.15 (evaluation excluded), training throughput ratio >= 0.95"
    out["plan"] = plan
    script_wall, script = run_script(plan, tmp)
    out |= {"script_wall_s": round(script_wall, 2), "script_stages": script}
    out["load_avg_between"] = os.getloadavg()
    path.write_text(json.dumps(out, indent=2) + "\n")  # the script half, should (b) not finish
    from flows.prefect_server import stop_server

    try:  # --quick: no evaluation at all (it is excluded from the comparison anyway)
        only = ",".join(stages) if stages else QUICK_STAGES if args.quick else None
        pipe_wall, steps = run_pipeline(config, overrides, tmp, only, args.threads)
    finally:
        stop_server(tmp / "prefect-home")  # the background API the run started
    out["load_avg_after"] = os.getloadavg()
    out |= compare(plan, script, steps, pipe_wall, tmp / "store")
    show(out)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    if args.cleanup:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"store kept: {tmp / 'store'} (plain script's output: {tmp / 'script-out'})")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
