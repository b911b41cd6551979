"""The pipeline's SFT against the plain script's, side by side at the same moment (issue #15).

    python benchmarks/sft_ab.py STORE [--reps 2] [--threads 1] [--steps 150] [--label L]
        [--sequential] [--malloc] [--out JSON]

Why: on a shared 2-core machine a stage timed a minute apart from its rival gets a different
share of the CPU, so pipeline_vs_script's wall ratios swing (SFT 0.68x to 2.4x). Here both
sides run *at once*, each in its own process with `--threads` torch threads, on the same rows,
tokenizer and base model, read from STORE (a store with a data and a pretrain or base artifact:
`pipeline_vs_script.py` keeps one, `fasttrack run --stages sft` makes one):
- script: benchmarks/plain_lifecycle.py's SFT recipe (TRL SFTTrainer + peft LoRA, 4-bit as
  the config says, no checkpoints, no callbacks) in this process;
- pipeline: tasks/sft.py's build in a training child forked from the zygote, as `fasttrack run`
  runs it (checkpoints, NaN guard, progress callback, eval before training), minus the flow.
`--sequential` runs the sides one after the other instead, alternating which goes first (ABBA),
for a quiet machine where each side may have every core (`--threads 2` on 2 cores): a single
pair of runs differs by +-15 % from one minute to the next even there, so only the geometric
mean over several reps says anything.
`--malloc` compares the script's recipe with glibc's malloc defaults against the same recipe with
fasttrack/core/malloc.py's tunables (what the pipeline's training processes get), and records
each side's minor page faults: the effect of the tunables alone, on code the pipeline did not
write.
Per rep: train wall and CPU seconds of both (all threads), real and padded tokens (equal on
both sides, or the comparison is void), their ratios; the geometric means over reps. Writes
benchmarks/results/sft_ab.json. ~1.5 min per rep on 2 loaded cores at 1 thread.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]


def refs(store_path: str) -> tuple:
    """(store, model ref, data ref): the newest pretrain (else base) and data artifacts."""
    from fasttrack.core.store import ArtifactStore

    store = ArtifactStore(store_path)

    def newest(stage: str):
        found = sorted(Path(store_path, stage).glob("*/manifest.json"), key=os.path.getmtime)
        return store.lookup(stage, json.loads(found[-1].read_text())["key"]) if found else None

    model = newest("pretrain") or newest("base")
    if model is None or newest("data") is None:
        raise SystemExit(f"{store_path}: no data and pretrain/base artifacts (run the pipeline)")
    return store, model, newest("data")


def config(store_path: str, steps: int):
    from fasttrack.core.config_loader import load_config

    return load_config(None, [f"store={store_path}", f"sft.max_steps={steps}"])


def rows(store, data, split: str, limit: int | None = None):
    import datasets

    from fasttrack.lib.datasets import read_split
    from tasks.sft import prompt_completion

    found = read_split(store, data, "sft", split)[:limit]
    return datasets.Dataset.from_list(prompt_completion(found))


def run_script(store_path: str, steps: int, work: Path) -> dict:
    """plain_lifecycle's sft_stage, on the pipeline's rows, tokenizer and base model."""
    import plain_lifecycle as plain
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from fasttrack.lib.models import load_tokenizer

    store, model_ref, data = refs(store_path)
    cfg = config(store_path, steps)
    s = cfg.sft
    tok, _ = load_tokenizer(cfg, model_ref)
    plan = {"seed": cfg.seed, "quantization": cfg.adapter.quantization.model_dump()}
    lora = cfg.adapter.lora.model_dump(
        include={"r", "lora_alpha", "lora_dropout", "target_modules", "bias"}
    )
    section = s.model_dump()  # max_steps, batch size, lr, scheduler, optimizer, eval cadence...
    val = rows(store, data, "validation", s.eval_max_rows)
    args = SFTConfig(
        **plain.train_args(section, work, plan, has_eval=True), max_length=s.max_length,
        packing=s.packing, eval_on_start=True, completion_only_loss=s.completion_only_loss,
        dataset_num_proc=1,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=plain.load_base(plan, Path(store.local_path(model_ref))), args=args,
        train_dataset=rows(store, data, "train"), eval_dataset=val, processing_class=tok,
        peft_config=LoraConfig(task_type="CAUSAL_LM", **lora),
    )  # fmt: skip
    result, cpu = plain.timed_train(trainer)
    history = trainer.state.log_history
    return {"train_seconds": round(result.metrics["train_runtime"], 2), "train_cpu_seconds": cpu,
            "tokens": max((h.get("num_tokens", 0) for h in history), default=0)}  # fmt: skip


def run_pipeline(store_path: str, steps: int, work: Path) -> dict:
    """tasks/sft.py's build in a forked training child (fasttrack/core/isolation.py)."""
    from fasttrack.core.isolation import run_isolated
    from tasks.sft import build_sft, sft_spec

    store, model_ref, data = refs(store_path)
    cfg = config(store_path, steps)
    spec = sft_spec(cfg, model_ref, data)
    shutil.rmtree(store.work_dir("sft", spec.key), ignore_errors=True)  # no resume
    result = run_isolated(build_sft, cfg, spec, work, stage="sft")
    history = json.loads((work / "log_history.json").read_text())
    m = result.metrics
    return {"train_seconds": m["train_seconds"], "train_cpu_seconds": m["train_cpu_seconds"],
            "tokens": max((h.get("num_tokens", 0) for h in history), default=0)}  # fmt: skip


SIDES = {False: ("script", "pipeline"), True: ("script", "script-tuned")}  # by --malloc


def worker(side: str, store_path: str, steps: int, threads: int) -> None:
    import resource

    import torch

    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix=f"sft-ab-{side}-"))
    try:
        run = run_pipeline if side == "pipeline" else run_script
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        result = run(store_path, steps, work) | {"side": side}
        result["minor_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        print("RESULT", json.dumps(result), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def rep(args: argparse.Namespace, index: int = 0) -> dict:
    """Both sides started together (or one after the other with --sequential); their figures."""
    from fasttrack.core.malloc import training_env

    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    base, other = SIDES[args.malloc]
    order = (base, other) if index % 2 == 0 else (other, base)

    def start(side: str) -> subprocess.Popen:
        return subprocess.Popen(
            [
                sys.executable,
                __file__,
                args.store,
                "--worker",
                side,
                "--steps",
                str(args.steps),
                "--threads",
                str(args.threads),
            ],
            env=training_env(env) if side == "script-tuned" else env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip

    procs = {} if args.sequential else {side: start(side) for side in order}
    out: dict = {"first": order[0]} if args.sequential else {}
    for side in order:
        proc = procs.get(side) or start(side)
        stdout, stderr = proc.communicate(timeout=3600)
        lines = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise SystemExit(f"{side} failed:\n{stderr[-3000:]}")
        out[side] = json.loads(lines[-1][7:])
    if out[base]["tokens"] != out[other]["tokens"]:
        raise SystemExit(f"the sides trained on different tokens: {out}")
    for key in ("train_seconds", "train_cpu_seconds"):  # throughput ratio other/base
        out[f"ratio_{key}"] = round(out[base][key] / out[other][key], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("store")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--label", default="")
    parser.add_argument("--sequential", action="store_true", help="one side at a time, ABBA")
    parser.add_argument("--malloc", action="store_true", help="script: glibc defaults vs tuned")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sft_ab.json"))
    parser.add_argument("--worker", choices=("script", "pipeline", "script-tuned"),
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.store, args.steps, args.threads)
    result = {"label": args.label, "threads": args.threads, "steps": args.steps,
              "sequential": args.sequential, "malloc": args.malloc,
              "load_avg_before": os.getloadavg(), "reps": []}  # fmt: skip
    for i in range(args.reps):
        result["reps"].append(rep(args, i))
        print(f"rep {i + 1}: {json.dumps(result['reps'][-1])}", flush=True)
    result["load_avg_after"] = os.getloadavg()
    for key in ("train_seconds", "train_cpu_seconds"):
        ratios = [r[f"ratio_{key}"] for r in result["reps"]]
        result[f"throughput_ratio_{key}_geomean"] = round(
            math.exp(sum(map(math.log, ratios)) / len(ratios)), 3
        )
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print({k: v for k, v in result.items() if k.startswith("throughput")}, f"wrote {args.out}")


if __name__ == "__main__":
    main()
