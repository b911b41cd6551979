"""QLoRA vs LoRA vs full fine-tune: training tokens/s and peak memory, one method per process.

    python benchmarks/qlora_gpu.py            # CUDA: ~0.5B Qwen2.5-shaped model; CPU: small model

Random init is fine: throughput and memory do not depend on the weights' values. Each method
trains `--steps` steps (after 2 warm-up steps) on random token batches with AdamW, in a fresh
subprocess so that peak memory (CUDA max_memory_allocated, or peak RSS on CPU) is its own.
On a machine without CUDA the script runs its CPU mode on a smaller model and records that the
GPU figures are pending. Writes benchmarks/results/qlora_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Qwen2.5-0.5B's shape (random init) on GPU; a small Llama-shaped model on CPU.
SHAPES = {
    "cuda": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, vocab_size=151936),
    "cpu": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=2, vocab_size=8192),
}  # fmt: skip
METHODS = ("full", "lora", "qlora")


def run_one(method: str, device: str, steps: int, batch: int, seq: int, model_dir: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    kwargs: dict = {"dtype": dtype}
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )  # fmt: skip
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if method != "qlora":
        model = model.to(device)
    if method == "qlora":
        from fasttrack.lib.adapters import disable_cpu_bf16_repack

        disable_cpu_bf16_repack(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if method in ("lora", "qlora"):
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    torch.manual_seed(0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, t0 = [], 0.0
    for step in range(steps + 2):
        if step == 2:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        ids = torch.randint(0, vocab, (batch, seq), device=device)
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (
        torch.cuda.max_memory_allocated()
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "method": method,
        "trainable_params": sum(p.numel() for p in params),
        "tokens_per_s": round(steps * batch * seq / seconds, 1),
        "peak_memory_gib": round(peak / 2**30, 3),
        "peak_memory_kind": "cuda max_memory_allocated" if device == "cuda" else "process peak RSS",
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        sys.path.insert(0, str(ROOT))
        result = run_one(args.child[0], device, args.steps, args.batch, args.seq, args.child[1])
        print("RESULT " + json.dumps(result))
        return
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = tempfile.mkdtemp(prefix="qlora-bench-")
    config = LlamaConfig(**SHAPES[device], max_position_embeddings=4096, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    n_params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    results = []
    for method in METHODS:
        cmd = [sys.executable, __file__, "--child", method, model_dir, "--steps", str(args.steps),
               "--batch", str(args.batch), "--seq", str(args.seq)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, check=True)
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
        results.append(json.loads(line.removeprefix("RESULT ")))
        print(results[-1], flush=True)
    full = next(r for r in results if r["method"] == "full")
    for r in results:
        r["tokens_per_s_vs_full"] = round(r["tokens_per_s"] / full["tokens_per_s"], 3)
        r["peak_memory_vs_full"] = round(r["peak_memory_gib"] / full["peak_memory_gib"], 3)
    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (2 cores)",
        "model": {**SHAPES[device], "parameters": n_params},
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "results": results,
        "gpu_figures": "measured"
        if device == "cuda"
        else "pending: no CUDA device was lent "
        "to this session; run `python benchmarks/qlora_gpu.py` on a GPU worker",
    }
    path = ROOT / f"benchmarks/results/qlora_{device}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
