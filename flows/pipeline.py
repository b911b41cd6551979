"""The end-to-end pipeline flow: an outline; every step is a cached stage task in tasks/.

Run it with the CLI (`fasttrack run [CONFIG]`) or directly:
    python -m flows.pipeline pipeline_configs/tiny-cpu.yaml
"""

from __future__ import annotations

import sys

from prefect import flow
from pydantic import BaseModel, Field

from tasks.config import STAGES, load_config
from tasks.data import data_task
from tasks.errors import ConfigError
from tasks.evaluate import evaluate_task
from tasks.models import base_task
from tasks.packing import pack_task
from tasks.pretrain import pretrain_task
from tasks.report import RunSummary, StepRunner, metrics_table, publish_table

STEPS = ("data", "base", "pack", "pretrain", "evaluate")
AVAILABLE = ("data", "pretrain", "evaluate")  # sft, dpo, rag land with their issues


class PipelineParams(BaseModel):
    """Parameters of a pipeline run (the form the Prefect UI shows for a deployment)."""

    config: str | None = Field(
        None, description="Run config YAML; default: pipeline_configs/tiny-cpu.yaml."
    )
    stages: list[str] = Field(
        list(AVAILABLE), description=f"Stages to run, of: {', '.join(AVAILABLE)}."
    )
    overrides: list[str] = Field([], description="Config overrides, e.g. pretrain.max_steps=50.")
    force: list[str] = Field(
        [], description=f"Steps to recompute even if cached: {', '.join(STEPS)} or all."
    )


def check_params(params: PipelineParams) -> None:
    for stage in params.stages:
        if stage not in STAGES:
            raise ConfigError(f"--stages: unknown stage {stage!r} (stages: {', '.join(STAGES)})")
        if stage not in AVAILABLE:
            raise ConfigError(f"--stages: stage {stage!r} is not available yet")
    for step in params.force:
        if step not in (*STEPS, "all"):
            raise ConfigError(f"--force: unknown step {step!r} (steps: {', '.join(STEPS)}, all)")


@flow(name="fasttrack-pipeline")
def pipeline(params: PipelineParams | None = None) -> RunSummary:
    """data -> base -> pack -> pretrain -> evaluate(base, pretrain); stages select what runs."""
    params = params or PipelineParams()
    check_params(params)
    cfg = load_config(params.config, params.overrides)
    run, wanted, models = StepRunner(params.force), set(params.stages), {}

    data = run(data_task, cfg)
    if wanted & {"pretrain", "evaluate"}:
        models["base"] = run(base_task, cfg, data)
    if "pretrain" in wanted:
        packed = run(pack_task, cfg, data, models["base"])
        models["pretrain"] = run(pretrain_task, cfg, packed, models["base"])
    table = []
    if "evaluate" in wanted:
        evals = {name: run(evaluate_task, cfg, ref, data) for name, ref in models.items()}
        table = metrics_table(evals)
        publish_table(table, cfg.name)
    return RunSummary(name=cfg.name, store=cfg.store, steps=run.steps, table=table)


if __name__ == "__main__":
    print(pipeline(PipelineParams(config=sys.argv[1] if len(sys.argv) > 1 else None)))
