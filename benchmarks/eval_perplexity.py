"""Batched strided perplexity vs the naive one-window-at-a-time loop: same number, how much faster.

    python benchmarks/eval_perplexity.py [--tokens 20000] [--reps 3]

Model: the default config's architecture (a Llama, random init: speed does not depend on the
weights); text: the demo corpus tokenized with a BPE tokenizer trained on it. The naive loop is
the Hugging Face docs' loop (one window per forward, `outputs.loss * trg_len`), corrected to count
exactly the scored tokens; tasks/perplexity.py batches windows and sums token NLLs itself.
Writes benchmarks/results/eval_perplexity.json.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.config import load_config
    from tasks.demo import DEMO_DIR
    from tasks.models import CHAT_TEMPLATE, build_tokenizer
    from tasks.perplexity import strided_perplexity

    cfg = load_config(None)
    texts = [json.loads(line)["text"] for line in (DEMO_DIR / "pydoc_topics.jsonl").open()]
    tok = build_tokenizer(texts, cfg.model.tokenizer.vocab_size, 2, CHAT_TEMPLATE)
    ids = torch.tensor([t for x in texts for t in tok(x)["input_ids"]][: args.tokens])
    a = cfg.model.architecture
    torch.manual_seed(0)
    shape = a.model_dump(exclude={"tie_word_embeddings", "rope_theta"})
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), **shape)).eval()
    p = cfg.evaluate.perplexity
    times: dict[str, list[float]] = {"naive": [], "batched": []}
    values = {}
    for _ in range(args.reps):
        t0 = time.perf_counter()
        values["naive"] = naive(model, ids, p.max_length, p.stride)
        times["naive"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        res = strided_perplexity(
            model, ids, max_length=p.max_length, stride=p.stride, batch_size=args.batch_size
        )
        values["batched"] = res.perplexity
        times["batched"].append(time.perf_counter() - t0)
    result = {
        "machine": f"{os.cpu_count()} cores, torch {torch.__version__}",
        "tokens": int(ids.numel()),
        "max_length": p.max_length,
        "stride": p.stride,
        "batch_size": args.batch_size,
        "perplexity_naive": values["naive"],
        "perplexity_batched": values["batched"],
        "relative_difference": abs(values["naive"] - values["batched"]) / values["naive"],
        "naive_s": [round(t, 3) for t in times["naive"]],
        "batched_s": [round(t, 3) for t in times["batched"]],
        "speedup": round(
            statistics.median(times["naive"]) / statistics.median(times["batched"]), 2
        ),
        "goal": "same number to 1e-4; speedup >= 3",
    }
    assert result["relative_difference"] < 1e-4, result
    out = ROOT / "benchmarks/results/eval_perplexity.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
