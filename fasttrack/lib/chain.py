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
from dataclasses import dataclass, field

from fasttrack.core.config import RunConfig
from fasttrack.core.errors import FastTrackError
from fasttrack.core.integrity import check, checked_lookup, quarantine
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


@dataclass
class RunModels:
    """The intact models of a run and, for each model stage it lacks, why."""

    found: dict[str, ArtifactRef] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)


MODEL_OF_STEP = {"data": "data", "base": "base", "pack": "pretrain", "pretrain": "pretrain",
                 "sft": "sft", "dpo_ref": "dpo", "dpo": "dpo"}  # fmt: skip


def find_models(
    cfg: RunConfig, data: ArtifactRef | None = None, quarantine_corrupt: bool = False
) -> RunModels:
    """The run's intact models (lookup only, nothing is built) with the reason each missing one
    is missing (not trained for this config, disabled, corrupt); `quarantine_corrupt` moves a
    corrupt one aside, as a run would."""
    store, out = ArtifactStore(cfg.store), RunModels()

    def look(name: str, *upstream: ArtifactRef) -> ArtifactRef | None:
        spec, model = stage_spec(name)(cfg, *upstream), MODEL_OF_STEP[name]
        ref, problems = check(store, spec.stage, spec.key)
        if problems:
            moved = _quarantine(store, spec.stage, spec.key) if quarantine_corrupt else ""
            out.missing[model] = (
                f"{spec.stage} {spec.key[:12]} is corrupt ({'; '.join(problems)}){moved}; "
                "`fasttrack run` rebuilds it"
            )
        elif ref is None:
            out.missing.setdefault(
                model, f"not trained for this config (no {spec.stage} {spec.key[:12]})"
            )
        return ref

    data = data or look("data")
    if data is None:
        raise FastTrackError(
            f"no data artifact for run {cfg.name!r} in {cfg.store}: run `fasttrack run` first"
        )
    out.found = walk(data, look)
    for stage in MODEL_ORDER:
        if stage in out.found:
            out.missing.pop(stage, None)
        elif stage in ("sft", "dpo") and not getattr(cfg, stage).enabled:
            out.missing[stage] = f"disabled in this config ({stage}.enabled: false)"
        else:
            out.missing.setdefault(stage, "not trained: a model it builds on is missing")
    return out


def _quarantine(store: ArtifactStore, stage: str, key: str) -> str:
    """Move a corrupt artifact aside as a run would (under its lock, after a re-check)."""
    try:
        with store.lock(stage, key):
            problems = check(store, stage, key)[1]
            if problems and (dest := quarantine(store, stage, key, problems)):
                return f", quarantined to {dest}"
    except OSError as exc:  # a read-only store: say so, answer anyway
        return f", not quarantined ({exc.strerror}: {exc.filename})"
    return ""


def run_models(cfg: RunConfig, data: ArtifactRef | None = None) -> dict[str, ArtifactRef]:
    """The intact model artifacts this config's run has published (lookup only, nothing is
    built; a corrupt one counts as absent). `data`: the run's data ref, if already known."""
    return find_models(cfg, data).found


def pick_model(cfg: RunConfig, requested: str | None = None) -> tuple[str, ArtifactRef, list[str]]:
    """(stage, ref, notes): the requested model, or the most trained one (DPO > SFT > pretrain)
    with a note for each newer model that is missing and why. The untrained base model only
    when requested: answering with it silently would pass random weights off as the run's."""
    models = find_models(cfg, quarantine_corrupt=True)
    where = f"run {cfg.name!r} in {ArtifactStore(cfg.store).url}"
    if requested:
        if requested not in MODEL_ORDER:
            raise FastTrackError(f"--model {requested}: expected one of {', '.join(MODEL_ORDER)}")
        if requested not in models.found:
            raise FastTrackError(f"--model {requested}: {models.missing[requested]} ({where})")
        return requested, models.found[requested], []
    for i, stage in enumerate(MODEL_ORDER[:-1]):
        if stage in models.found:
            notes = [f"{s}: {models.missing[s]}" for s in MODEL_ORDER[:i]]
            return stage, models.found[stage], notes
    why = "; ".join(f"{s}: {models.missing[s]}" for s in MODEL_ORDER[:-1])
    raise FastTrackError(
        f"no trained model for {where} ({why}); run `fasttrack run`, or use the untrained base "
        "model explicitly with --model base"
    )
