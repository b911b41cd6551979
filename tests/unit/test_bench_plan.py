"""The plain-script benchmark (benchmarks/pipeline_vs_script.py) must give the script the same
training settings the pipeline uses: with transformers' default optimizer (the fused AdamW)
the script ran a different optimizer than the pipeline's `adamw_torch`, so the per-stage
throughput ratios did not compare like with like."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import pipeline_vs_script as bench  # noqa: E402
import plain_lifecycle as plain  # noqa: E402


@pytest.mark.parametrize("optimizer", ["adamw_torch", "adamw_8bit"])
def test_script_trains_with_the_configs_optimizer(tmp_path: Path, optimizer: str) -> None:
    overrides = [f"{s}.optimizer={optimizer}" for s in ("pretrain", "sft", "dpo")]
    plan = bench.load_plan(bench.CONFIG, overrides)
    for stage in ("pretrain", "sft", "dpo"):
        args = plain.train_args(plan[stage], tmp_path, plan, has_eval=True)
        assert args["optim"] == optimizer, stage


def test_stages_bring_what_they_need() -> None:
    assert bench.with_needs("sft") == ["data", "pretrain", "sft"]
    assert bench.with_needs("rag,pretrain") == ["data", "pretrain", "rag"]
    with pytest.raises(SystemExit, match="--stages: unknown evaluate"):
        bench.with_needs("sft,evaluate")
