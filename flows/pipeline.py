"""The end-to-end pipeline flow: an outline; every step is a cached stage task in tasks/.

Run it with the CLI (`fasttrack run [CONFIG]`) or directly:
    python -m flows.pipeline pipeline_configs/tiny-cpu.yaml
"""

from __future__ import annotations

import sys

from prefect import flow
from pydantic import BaseModel, Field

from fasttrack.core.compute import eval_runner, eval_threads, rag_in_parallel
from fasttrack.core.config import STAGES, RunConfig
from fasttrack.core.config_loader import load_config
from fasttrack.core.store import ArtifactRef, ArtifactStore
from fasttrack.lib.chain import MODEL_CHAIN, MODEL_ORDER, run_models, walk
from fasttrack.lib.evalstats import bootstrap_of
from fasttrack.lib.gates import enforce_gates
from fasttrack.lib.preflight import preflight
from fasttrack.lib.tables import metrics_table, publish_table, retrieval_table
from fasttrack.lib.tracking import Tracker, tracked
from fasttrack.lib.training import prestart_children
from flows.runner import RunSummary, StepRunner
from flows.steps import STEPS, check_names
from tasks.base import base_task
from tasks.data import data_task
from tasks.dpo import dpo_ref_task, dpo_task
from tasks.evaluate import evaluate_task
from tasks.export import export_target, export_task, publish_exports
from tasks.pack import pack_task
from tasks.pretrain import pretrain_task
from tasks.rag import rag_task
from tasks.report import publish_report, report_task
from tasks.sft import sft_task

CHAIN_TASKS = {  # the model chain's steps (their order and upstreams: fasttrack/lib/chain.py)
    "base": base_task, "pack": pack_task, "pretrain": pretrain_task,
    "sft": sft_task, "dpo_ref": dpo_ref_task, "dpo": dpo_task,
}  # fmt: skip


class PipelineParams(BaseModel):
    """Parameters of a pipeline run (the form the Prefect UI shows for a deployment)."""

    config: str | None = Field(
        None, description="Run config YAML; default: pipeline_configs/tiny-cpu.yaml."
    )
    stages: list[str] = Field(list(STAGES), description=f"Stages to run, of: {', '.join(STAGES)}.")
    overrides: list[str] = Field([], description="Config overrides, e.g. pretrain.max_steps=50.")
    force: list[str] = Field(
        [], description=f"Steps to recompute even if cached: {', '.join(STEPS)} or all."
    )


def check_params(params: PipelineParams) -> None:
    check_names(params.stages, params.force)


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
    gates -> export (export.formats) -> the report again, with the export table; rag (data ->
    index) runs concurrently with training when the machine has cores for both
    (compute.rag_concurrency), else after it."""
    params = params or PipelineParams()
    check_params(params)
    cfg = load_config(params.config, params.overrides)
    wanted = enabled_stages(cfg, params)
    preflight(cfg, wanted)  # a no-op when the CLI already checked this config
    with tracked(cfg) as tracker:  # MLflow/TensorBoard (tracking:); never fails the run
        return _steps(cfg, params, wanted, StepRunner(params.force, on_step=tracker.step), tracker)


def _steps(
    cfg: RunConfig, params: PipelineParams, wanted: set[str], run: StepRunner, tracker: Tracker
) -> RunSummary:
    models: dict[str, ArtifactRef] = {}
    report = None

    data = run(data_task, cfg)
    if run.steps[-1].status == "executed":  # new data: every training step will run
        prestart_children(cfg, wanted, cold=True)
    parallel = rag_in_parallel(cfg.compute)  # alongside training only where cores allow
    index = run.submit(rag_task, cfg, data) if "rag" in wanted and parallel else None
    if wanted - {"data", "rag"}:  # base, [pack, pretrain], sft, [dpo_ref, dpo]
        models = walk(data, lambda step, *ups: run(CHAIN_TASKS[step], cfg, *ups), wanted)
    if "rag" in wanted and not parallel:
        index = run.submit(rag_task, cfg, data)
    rag = run.collect(index) if index else None
    table, exports = [], []
    if "evaluate" in wanted:
        models = trained_models(cfg, data, models)
        # threads (the cores split between them), or Dask workers (compute.*)
        with eval_runner(cfg.compute) as runner, eval_threads(cfg.compute):
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
        publish_table(table, cfg.name, cfg.evaluate.bootstrap.level)
        tracker.table(table)
        report_ref = run(report_task, cfg, evals, models, rag)
        publish_report(cfg, report_ref)
        report = str(ArtifactStore(cfg.store).local_path(report_ref) / "report.md")
        # a failed gate fails the run, naming it; the promoted model goes to MLflow's registry
        tracker.register(enforce_gates(cfg, table, models, evals))
        if cfg.export.formats:  # only what passed the gates is exported
            target = export_target(cfg, models)
            refs = [run(export_task, cfg, target, data, f, label=f"export:{f}")
                    for f in cfg.export.formats]  # fmt: skip
            exports = publish_exports(refs, cfg.name)
            report_ref = run(report_task, cfg, evals, models, rag, refs, label="report:exports")
            publish_report(cfg, report_ref)  # the same report, now with the export table
            report = str(ArtifactStore(cfg.store).local_path(report_ref) / "report.md")
    retrieval = retrieval_table(rag, ArtifactStore(cfg.store), bootstrap_of(cfg)) if rag else []
    return RunSummary(
        name=cfg.name, store=str(cfg.store), steps=run.steps, table=table, retrieval=retrieval,
        report=report,
        exports=exports,
    )  # fmt: skip


if __name__ == "__main__":
    print(pipeline(PipelineParams(config=sys.argv[1] if len(sys.argv) > 1 else None)))
