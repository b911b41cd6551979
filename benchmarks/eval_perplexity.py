"""Production strided perplexity vs the naive one-window-at-a-time loop: same number, speed.

    python benchmarks/eval_perplexity.py [--tokens 20000] [--reps 7] [--threads N] [--device D]

Model: the default config's model exactly as the base stage builds it (Llama, hidden 128, 2
layers, vocab 4096, tied embeddings), random init: speed does not depend on the weights and the
equality check holds for any weights. Text: the demo corpus tokenized with a BPE tokenizer
trained on it; window and stride: the default evaluate.perplexity settings (256 / 128).

Baseline: the Hugging Face docs loop a user would write (one window per forward,
``model(input_ids, labels=masked).loss``), corrected to count exactly the scored tokens.
Candidate: fasttrack/lib/perplexity.py (windows of one shape batched without padding, logits and
softmax only on the scored positions via ``logits_to_keep``, no KV cache), at the config's batch
size. The machine is shared, so baseline and candidate alternate in the same process (order
flipped every rep) and the median of the per-rep ratios is reported, for wall time and for
process CPU time, with the ratio of the best reps (least disturbed by other load).
Runs on CUDA when a GPU is visible (``--device`` to choose), synchronising before each clock
read. Writes benchmarks/results/eval_perplexity.json (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@torch.inference_mode()
def naive(model, ids: torch.Tensor, max_length: int, stride: int) -> float:
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.numel(), stride):
        end = min(begin + max_length, ids.numel())
        trg_len = end - prev_end
        window = ids[begin:end].unsqueeze(0)
        labels = window.clone()
        labels[:, :-trg_len] = -100
        loss = model(input_ids=window, labels=labels).loss
        scored = int((labels[:, 1:] != -100).sum())
        nll += float(loss) * scored
        count += scored
        prev_end = end
        if end == ids.numel():
            break
    return math.exp(nll / count)


def timed(fn, device: str) -> tuple[float, float, float]:
    """(value, wall seconds, process CPU seconds); GPU work is finished before each clock read."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    sync()
    return value, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--batch-size", type=int, help="default: evaluate.perplexity.batch_size")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/eval_perplexity.json"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    from fasttrack.core.config_loader import load_config
    from fasttrack.lib.demo import DEMO_DIR
    from fasttrack.lib.models import CHAT_TEMPLATE, build_tokenizer
    from fasttrack.lib.perplexity import strided_perplexity

    cfg = load_config(None)
    texts = [json.loads(line)["text"] for line in (DEMO_DIR / "pydoc_topics.jsonl").open()]
    t = cfg.model.tokenizer
    tok = build_tokenizer(texts, t.vocab_size, t.min_frequency, CHAT_TEMPLATE)
    ids = torch.tensor([i for x in texts for i in tok(x)["input_ids"]][: args.tokens])
    ids = ids.to(args.device)
    torch.manual_seed(cfg.seed)
    arch = cfg.model.architecture.model_dump()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), **arch)).eval().to(args.device)
    p = cfg.evaluate.perplexity
    batch_size = args.batch_size or p.batch_size
    runs = {
        "naive": lambda: naive(model, ids, p.max_length, p.stride),
        "production": lambda: (
            strided_perplexity(
                model, ids, max_length=p.max_length, stride=p.stride, batch_size=batch_size
            ).perplexity
        ),
    }
    for fn in runs.values():  # warm-up: allocator, thread pool, lazy inits
        fn()
    load_before = os.getloadavg()[0]
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    values: dict[str, float] = {}
    for rep in range(args.reps):
        for name in runs if rep % 2 == 0 else reversed(runs):
            values[name], w, c = timed(runs[name], args.device)
            wall[name].append(w)
            cpu[name].append(c)

    def ratios(times: dict[str, list[float]]) -> list[float]:
        return [n / b for n, b in zip(times["naive"], times["production"], strict=True)]

    result = {
        "machine": f"{os.cpu_count()} cores (shared), torch {torch.__version__}",
        "device": torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else "cpu",
        "threads": torch.get_num_threads(),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "model": f"default config Llama from scratch, vocab {len(tok)}, "
        f"tie_word_embeddings={model.config.tie_word_embeddings}, random init",
        "tokens": int(ids.numel()),
        "max_length": p.max_length,
        "stride": p.stride,
        "batch_size": batch_size,
        "perplexity_naive": values["naive"],
        "perplexity_production": values["production"],
        "relative_difference": abs(values["naive"] - values["production"]) / values["naive"],
        "naive_wall_s": [round(x, 3) for x in wall["naive"]],
        "production_wall_s": [round(x, 3) for x in wall["production"]],
        "naive_cpu_s": [round(x, 3) for x in cpu["naive"]],
        "production_cpu_s": [round(x, 3) for x in cpu["production"]],
        "speedup_wall_per_rep": [round(x, 2) for x in ratios(wall)],
        "speedup_wall_median": round(statistics.median(ratios(wall)), 2),
        "speedup_cpu_median": round(statistics.median(ratios(cpu)), 2),
        # least-disturbed rep of each: closest to a quiet machine when others load it
        "speedup_wall_best": round(min(wall["naive"]) / min(wall["production"]), 2),
        "goal": "same number to 1e-4; speedup >= 3",
    }
    assert result["relative_difference"] < 1e-4, result
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
