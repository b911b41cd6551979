"""What `fasttrack serve` serves: the promoted model of a run, one of its stages, or a key.

The promoted model (the store's `promoted.json` entry of the config's run, written by the gates)
is what a deployment should answer with; without one, the newest model the run trained.
"""

from __future__ import annotations

import json

from fasttrack.core.config import RunConfig
from fasttrack.core.errors import ModelError
from fasttrack.core.integrity import checked_lookup
from fasttrack.core.store import PROMOTED, ArtifactRef, ArtifactStore
from fasttrack.lib.chain import MODEL_ORDER, pick_model, run_models

CHOICES = ("promoted", *MODEL_ORDER)


def promoted_record(cfg: RunConfig) -> dict | None:
    """This run's entry of `<store>/promoted.json`, or None."""
    store = ArtifactStore(cfg.store)
    try:
        with store.fs.open(f"{store.root}/{PROMOTED}", "rb") as f:
            record = json.loads(f.read()).get(cfg.name)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ModelError(f"{store.root}/{PROMOTED}: not a JSON object ({exc})") from None
    return record if isinstance(record, dict) else None


def resolve_model(cfg: RunConfig, which: str = "promoted") -> tuple[str, ArtifactRef]:
    """(stage, ref) for `--model`: promoted (else newest), a stage name, or a key prefix."""
    if which == "promoted":
        record = promoted_record(cfg)
        if record is None:  # the most trained model; never the untrained base unless asked
            stage, ref, _ = pick_model(cfg)
            return stage, ref
        stage, key = record["stage"], record["promoted"]
        ref = checked_lookup(ArtifactStore(cfg.store), stage, key)
        if ref is None:
            raise ModelError(
                f"serve: the promoted model of run {cfg.name!r} ({stage}/{key[:12]}) is missing "
                f"or corrupt in {cfg.store}; run `fasttrack run` again or pick --model"
            )
        return stage, ref
    models = run_models(cfg)
    if which in models:
        return which, models[which]
    matches = [(s, r) for s, r in models.items() if len(which) >= 6 and r.key.startswith(which)]
    if len(matches) == 1:
        return matches[0]
    have = ", ".join(f"{s} ({r.short})" for s, r in models.items()) or "none"
    raise ModelError(
        f"serve --model {which}: run {cfg.name!r} has no such model in {cfg.store} (has: {have})"
    )
