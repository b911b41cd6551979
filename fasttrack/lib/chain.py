"""The model chain, written once: which models a config produces, from what, in what order.

    data -> base -> [pack -> pretrain] -> sft -> [dpo_ref -> dpo]

`walk` is the only place that knows each step's upstreams. The flow walks it with a step function
that runs Prefect tasks; evaluation-only runs, `ask`, serving, gates and reports walk it with one
that only looks artifacts up (`run_models`, `newest_model`). Keys come from the stage modules'
spec functions through the stage registry (`fasttrack.core.stage.stage_spec`), so this module never
imports a stage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from fasttrack.core.config import RunConfig
from fasttrack.core.errors import FastTrackError
from fasttrack.core.integrity import checked_lookup
from fasttrack.core.stage import stage_spec
from fasttrack.core.store import ArtifactRef, ArtifactStore

MODEL_ORDER = ("dpo", "sft", "pretrain", "base")  # newest first
MODEL_CHAIN = tuple(reversed(MODEL_ORDER))  # base, pretrain, sft, dpo
TRAINING = ("pretrain", "sft", "dpo")
Step = Callable[..., ArtifactRef | None]  # step(name, *upstream refs) -> ref, or None: stop


def walk(data: ArtifactRef, step: Step, wanted: Iterable[str] = TRAINING) -> dict[str, ArtifactRef]:
    """The models of the chain, oldest first, as `step` produces or finds them.

    `wanted`: the training stages to include (sft is included when dpo is wanted).
    """
    wanted = set(wanted)
    models: dict[str, ArtifactRef] = {}
    if (base := step("base", data)) is None:
        return models
    models["base"] = start = base
    packed = step("pack", data, base) if "pretrain" in wanted else None
    if packed and (pre := step("pretrain", packed, base)):
        models["pretrain"] = start = pre
    if not wanted & {"sft", "dpo"} or (tuned := step("sft", start, data)) is None:
        return models
    models["sft"] = tuned
    ref = step("dpo_ref", start, tuned, data) if "dpo" in wanted else None
    if ref and (aligned := step("dpo", start, tuned, ref, data)):
        models["dpo"] = aligned
    return models


def lookup(cfg: RunConfig, name: str, *upstream: ArtifactRef) -> ArtifactRef | None:
    """The intact artifact of step `name` for this config and upstreams, or None (no build)."""
    spec = stage_spec(name)(cfg, *upstream)
    return checked_lookup(ArtifactStore(cfg.store), spec.stage, spec.key)


def run_data(cfg: RunConfig) -> ArtifactRef:
    """The data artifact of this config's run (lookup only)."""
    if (data := lookup(cfg, "data")) is None:
        raise FastTrackError(
            f"no data artifact for run {cfg.name!r} in {cfg.store}: run `fasttrack run` first"
        )
    return data


def run_models(cfg: RunConfig, data: ArtifactRef | None = None) -> dict[str, ArtifactRef]:
    """The intact model artifacts this config's run has published (lookup only, nothing is
    built; a corrupt one counts as absent). `data`: the run's data ref, if already known."""
    data = data or run_data(cfg)
    return walk(data, lambda name, *ups: lookup(cfg, name, *ups))


def newest_model(cfg: RunConfig) -> tuple[str, ArtifactRef]:
    """(stage, ref) of the most trained model of the run: DPO > SFT > pretrain > base."""
    models = run_models(cfg)
    for stage in MODEL_ORDER:
        if stage in models:
            return stage, models[stage]
    raise FastTrackError(
        f"no model artifact for run {cfg.name!r} in {cfg.store}: run `fasttrack run` first"
    )
