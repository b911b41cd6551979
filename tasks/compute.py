"""Where and how training runs: the `compute:` section of a run config.

Kept apart from tasks/config.py because it grows with the launchers (child process today;
accelerate for several processes/GPUs) and none of it changes a stage's result, so none of it
is part of any artifact key.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ComputeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    isolate: bool = Field(
        True,
        description="Train in a child process, so cancel/timeout/Ctrl-C really stop it "
        "(false: train in the flow process, for debugging).",
    )
