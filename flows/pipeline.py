"""The end-to-end pipeline flow: an outline; every step is a cached stage task in tasks/.

Run it with the CLI (`fasttrack run [CONFIG]`) or directly:
    python -m flows.pipeline pipeline_configs/tiny-cpu.yaml
"""

from __future__ import annotations

import sys

from prefect import flow
from pydantic import BaseModel, Field

from tasks.compute import eval_runner
from tasks.config import STAGES, RunConfig, load_config
from tasks.data import data_task
from tasks.dpo import dpo_ref_task, dpo_task
from tasks.errors import ConfigError
from tasks.evaluate import evaluate_task
from tasks.export import export_target, export_task, publish_exports
from tasks.gates import enforce_gates
from tasks.generate import MODEL_ORDER, run_models
from tasks.models import base_task
from tasks.packing import pack_task
from tasks.pretrain import pretrain_task
from tasks.rag import rag_task
from tasks.report import RunSummary, StepRunner, metrics_table, publish_table, retrieval_table
from tasks.run_report import publish_report, report_task
from tasks.sft import sft_task
from tasks.store import ArtifactRef

STEPS = ("data", "base", "pack", "pretrain", "sft", "dpo_ref", "dpo", "rag", "evaluate", "report",
         "export")  # fmt: skip
MODEL_CHAIN = tuple(reversed(MODEL_ORDER))  # base, pretrain, sft, dpo
AVAILABLE = ("data", "pretrain", "sft", "dpo", "rag", "evaluate")


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


def enabled_stages(cfg: RunConfig, params: PipelineParams) -> set[str]:
    off = {name for name in ("sft", "dpo", "rag") if not getattr(cfg, name).enabled}
    return set(params.stages) - off


def trained_models(
    cfg: RunConfig, data: ArtifactRef, models: dict[str, ArtifactRef]
) -> dict[str, ArtifactRef]:
    """The models this run built plus those of the same config already in the store, so
    `--stages data,evaluate` evaluates what earlier runs trained without training anything."""
    found = run_models(cfg, data)
    return {m: models.get(m) or found[m] for m in MODEL_CHAIN if m in models or m in found}


@flow(name="fasttrack-pipeline")
def pipeline(params: PipelineParams | None = None) -> RunSummary:
    """data -> base -> pack -> pretrain -> sft -> dpo_ref -> dpo -> evaluate(every model) ->
    gates -> export (export.formats); rag (data -> index) runs concurrently with training."""
    params = params or PipelineParams()
    check_params(params)
    cfg = load_config(params.config, params.overrides)
    run, wanted, models = StepRunner(params.force), enabled_stages(cfg, params), {}

    data = run(data_task, cfg)
    index = run.submit(rag_task, cfg, data) if "rag" in wanted else None
    if wanted - {"data", "rag"}:
        models["base"] = run(base_task, cfg, data)
    if "pretrain" in wanted:
        packed = run(pack_task, cfg, data, models["base"])
        models["pretrain"] = run(pretrain_task, cfg, packed, models["base"])
    start = models.get("pretrain", models.get("base"))
    if wanted & {"sft", "dpo"}:
        models["sft"] = run(sft_task, cfg, start, data)
    if "dpo" in wanted:
        ref = run(dpo_ref_task, cfg, start, models["sft"], data)
        models["dpo"] = run(dpo_task, cfg, start, models["sft"], ref, data)
    rag = run.collect(index) if index else None
    table, exports = [], []
    if "evaluate" in wanted:
        models = trained_models(cfg, data, models)
        with eval_runner(cfg.compute) as runner:  # threads, or Dask workers (compute.*)
            pending = {
                m: run.submit(evaluate_task, cfg, ref, data, label=f"evaluate:{m}", runner=runner)
                for m, ref in models.items()
            }
            if rag and (newest := next((m for m in MODEL_ORDER if m in models), None)):
                label = f"{newest}+rag"
                pending[label] = run.submit(
                    evaluate_task, cfg, models[newest], data, rag,
                    label=f"evaluate:{label}", runner=runner,
                )  # fmt: skip
            evals = {m: run.collect(p) for m, p in pending.items()}
        table = metrics_table(evals)
        publish_table(table, cfg.name)
        publish_report(cfg, run(report_task, cfg, evals, models, rag))
        enforce_gates(cfg, table, models)  # a failed gate fails the run, naming it
        if cfg.export.formats:  # only what passed the gates is exported
            target = export_target(cfg, models)
            refs = [run(export_task, cfg, target, data, f, label=f"export:{f}")
                    for f in cfg.export.formats]  # fmt: skip
            exports = publish_exports(refs, cfg.name)
    retrieval = retrieval_table(rag) if rag else []
    return RunSummary(
        name=cfg.name, store=str(cfg.store), steps=run.steps, table=table, retrieval=retrieval,
        exports=exports,
    )  # fmt: skip


if __name__ == "__main__":
    print(pipeline(PipelineParams(config=sys.argv[1] if len(sys.argv) > 1 else None)))
