"""SFT throughput with packing vs without, same data, same model, same process.

    python benchmarks/sft_packing.py [CONFIG] [--reps 2]

Each run trains one epoch over the same SFT train split (so both see exactly the same real
tokens) with the config's SFT settings, once with `packing: false` (dynamic padding to the
longest row of each batch) and once with `packing: true` (TRL's BFD packing, padding-free, no
cross-sample attention). Real tokens/s = tokens in the split / wall time of `trainer.train()`.
Runs alternate and the medians are compared. Writes benchmarks/results/sft_packing.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one_epoch(cfg, model_ref, data_ref, packing: bool) -> tuple[float, int]:
    """(seconds for one epoch, real tokens in the epoch)."""
    import datasets

    from fasttrack.core.store import ArtifactStore
    from fasttrack.lib.adapters import load_for_training
    from fasttrack.lib.datasets import read_split
    from tasks.sft import prompt_completion, sft_trainer

    store = ArtifactStore(cfg.store)
    rows = prompt_completion(read_split(store, data_ref, "sft", "train"))
    model, tok, _ = load_for_training(cfg, model_ref)
    once = {"max_steps": -1, "num_train_epochs": 1, "save_strategy": "no", "logging_steps": 10**6}
    train = datasets.Dataset.from_list(rows)
    work = Path(tempfile.mkdtemp())
    trainer = sft_trainer(cfg, model, tok, train, None, work, packing=packing, **once)
    ds = trainer.train_dataset
    tokens = sum(len(ids) for ids in ds["input_ids"])
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default=str(ROOT / "pipeline_configs/tiny-cpu.yaml"))
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()

    from fasttrack.core.config_loader import load_config
    from tasks.base import resolve_base
    from tasks.data import prepare_data

    store = tempfile.mkdtemp(prefix="fasttrack-packing-")
    cfg = load_config(args.config, [f"store={store}"])
    data = prepare_data(cfg)
    base = resolve_base(cfg, data)
    runs: dict[str, list[float]] = {"padded": [], "packed": []}
    tokens = {}
    for rep in range(args.reps):
        for name, packing in (("padded", False), ("packed", True)):
            seconds, n = one_epoch(cfg, base, data, packing)
            runs[name].append(n / seconds)
            tokens[name] = n
            print(
                f"rep {rep} {name}: {n} tokens in {seconds:.1f}s = {n / seconds:.0f} tok/s",
                flush=True,
            )
    assert tokens["padded"] == tokens["packed"], tokens  # same real tokens either way
    result = {
        "config": os.path.relpath(args.config, ROOT),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "sft": {
            "max_length": cfg.sft.max_length,
            "batch": cfg.sft.per_device_batch_size,
            "quantization": cfg.adapter.quantization.load_in_4bit,
        },  # fmt: skip
        "real_tokens_per_epoch": tokens["packed"],
        "padded_tokens_per_s": [round(x, 1) for x in runs["padded"]],
        "packed_tokens_per_s": [round(x, 1) for x in runs["packed"]],
        "speedup": round(statistics.median(runs["packed"]) / statistics.median(runs["padded"]), 3),
        "goal": "speedup >= 1.5 on CPU",
    }
    out = ROOT / "benchmarks/results/sft_packing.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
