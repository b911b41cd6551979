"""The pipeline's step names and the check of `--stages`/`--force`, without the flow's imports
(Prefect, every stage's libraries), so the CLI rejects a misspelt name in a second."""

from __future__ import annotations

from fasttrack.core.config import STAGES
from fasttrack.core.errors import ConfigError

STEPS = ("data", "base", "pack", "pretrain", "sft", "dpo_ref", "dpo", "rag", "evaluate", "report",
         "export")  # fmt: skip


def check_names(stages: list[str], force: list[str]) -> None:
    for stage in stages:
        if stage not in STAGES:
            raise ConfigError(f"--stages: unknown stage {stage!r} (stages: {', '.join(STAGES)})")
    for step in force:
        if step not in (*STEPS, "all"):
            raise ConfigError(f"--force: unknown step {step!r} (steps: {', '.join(STEPS)}, all)")
