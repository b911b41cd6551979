"""`fasttrack export`: export a model a run already trained, without re-running the pipeline.

python -m flows.export pipeline_configs/tiny-cpu.yaml gguf-q8_0 merged
"""

from __future__ import annotations

import sys

from prefect import flow
from pydantic import BaseModel, Field

from fasttrack.core.config import RunConfig
from fasttrack.core.config_eval import check_export_formats
from fasttrack.core.config_loader import load_config
from fasttrack.core.errors import FastTrackError
from fasttrack.core.integrity import checked_lookup
from fasttrack.core.store import ArtifactRef, ArtifactStore
from fasttrack.lib.chain import MODEL_ORDER, run_models
from flows.runner import RunSummary, StepRunner
from tasks.data import data_spec
from tasks.export import FORMATS, export_target, export_task, publish_exports


class ExportParams(BaseModel):
    config: str | None = Field(None, description="Run config YAML; default: tiny-cpu.")
    formats: list[str] = Field([], description=f"Of: {', '.join(FORMATS)}; default: the config's.")
    model: str = Field("", description="newest, dpo, sft, pretrain, base or an artifact key.")
    overrides: list[str] = Field([], description="Config overrides, e.g. export.speed_tokens=16.")
    force: bool = False


def export_config(params: ExportParams) -> RunConfig:
    """The run config with the formats and model of the command line (checked, early)."""
    cfg = load_config(params.config, params.overrides)
    formats = check_export_formats(params.formats, list(cfg.export.formats))
    update = {"formats": formats}
    if params.model in ("newest", *MODEL_ORDER):
        update["model"] = params.model
    return cfg.model_copy(update={"export": cfg.export.model_copy(update=update)})


def model_by_key(store: ArtifactStore, prefix: str) -> ArtifactRef:
    """The intact model artifact (base, pretrain, sft, dpo) whose key starts with `prefix`."""
    hits = [
        m for m in store.manifests() if m["stage"] in MODEL_ORDER and m["key"].startswith(prefix)
    ]
    if len(hits) != 1:
        what = "no" if not hits else f"{len(hits)}"
        raise FastTrackError(
            f"--model {prefix}: {what} model artifacts in {store.url} have a key starting so "
            "(give a stage: newest, dpo, sft, pretrain, base, or a longer key)"
        )
    ref = checked_lookup(store, hits[0]["stage"], hits[0]["key"])
    if ref is None:
        raise FastTrackError(f"--model {prefix}: artifact {hits[0]['key'][:12]} is corrupt")
    return ref


def resolve(params: ExportParams) -> tuple[RunConfig, ArtifactRef, ArtifactRef]:
    """(config, data ref, model ref) of an export, from the store only (nothing is built):
    the CLI calls it to fail fast, before Prefect starts."""
    cfg = export_config(params)
    store = ArtifactStore(cfg.store)
    data = checked_lookup(store, "data", data_spec(cfg).key)
    if data is None:
        raise FastTrackError(
            f"no data artifact for run {cfg.name!r} in {cfg.store}: run `fasttrack run` first"
        )
    if params.model and params.model not in ("newest", *MODEL_ORDER):
        return cfg, data, model_by_key(store, params.model)
    return cfg, data, export_target(cfg, run_models(cfg, data))


@flow(name="fasttrack-export")
def export_flow(params: ExportParams) -> RunSummary:
    """Export the run's model (or the artifact `--model` names) in every requested format."""
    cfg, data, target = resolve(params)
    run = StepRunner(["export"] if params.force else [])
    refs = [run(export_task, cfg, target, data, f, label=f"export:{f}") for f in cfg.export.formats]
    return RunSummary(name=cfg.name, store=str(cfg.store), steps=run.steps, table=[],
                      exports=publish_exports(refs, cfg.name))  # fmt: skip


if __name__ == "__main__":
    print(export_flow(ExportParams(config=sys.argv[1], formats=sys.argv[2:])))
