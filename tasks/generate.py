"""Generation with the configured decoding strategy, and the newest model of a run.

Batched generation pads on the left (decoder-only models continue from the last position), goes
through the chat template with the generation prompt, and stops at EOS; the decoding settings
are returned with the answers so every number can say how it was produced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tasks.config import GenerationConfig, RunConfig
from tasks.errors import FastTrackError
from tasks.integrity import check, quarantine
from tasks.store import ArtifactRef, ArtifactStore

MODEL_ORDER = ("dpo", "sft", "pretrain", "base")  # newest first


def generation_kwargs(g: GenerationConfig, tok: Any) -> dict[str, Any]:
    """transformers `generate` kwargs for greedy, sampling (top-k/top-p/temperature) or beam."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": g.max_new_tokens,
        "repetition_penalty": g.repetition_penalty,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    }
    if g.strategy == "sample":
        kwargs |= {
            "do_sample": True,
            "temperature": g.temperature,
            "top_k": g.top_k,
            "top_p": g.top_p,
        }
    elif g.strategy == "beam":
        kwargs |= {"do_sample": False, "num_beams": g.num_beams, "early_stopping": True}
    else:
        kwargs |= {"do_sample": False}
    return kwargs


@torch.inference_mode()
def generate(
    model: Any, tok: Any, prompts: list[str], g: GenerationConfig, seed: int = 0
) -> list[str]:
    """Answers to user prompts (chat template, left padding, stop at EOS)."""
    from tasks.adapters import disable_cpu_bf16_repack

    disable_cpu_bf16_repack(model)  # a no-grad forward on 4-bit CPU layers must not repack them
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    from tasks.models import max_positions

    limit = max_positions(model)
    room = max(limit - g.max_new_tokens, 1) if limit else None
    sides = tok.padding_side, tok.truncation_side
    tok.padding_side = tok.truncation_side = "left"  # keep the end: the question and the cue
    try:
        batch = tok(
            texts,
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
            truncation=room is not None,
            max_length=room,
        )
    finally:
        tok.padding_side, tok.truncation_side = sides
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    model.eval()
    out = model.generate(**batch.to(device), **generation_kwargs(g, tok))
    new = out[:, batch["input_ids"].shape[1] :]
    return [tok.decode(ids, skip_special_tokens=True).strip() for ids in new]


@dataclass
class RunModels:
    """The intact models of a run and, for each model stage it lacks, why."""

    found: dict[str, ArtifactRef] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)


def run_models(cfg: RunConfig, data: ArtifactRef | None = None) -> dict[str, ArtifactRef]:
    """The intact model artifacts this config's run has published (lookup only, nothing is
    built; a corrupt one counts as absent). `data`: the run's data ref, if already known."""
    return find_models(cfg, data).found


def find_models(
    cfg: RunConfig, data: ArtifactRef | None = None, quarantine_corrupt: bool = False
) -> RunModels:
    """`run_models` with the reason each missing model is missing (not trained for this
    config, disabled, corrupt); `quarantine_corrupt` moves a corrupt one aside, as a run would."""
    from tasks.data import data_spec
    from tasks.dpo import dpo_spec, ref_spec
    from tasks.models import base_spec
    from tasks.packing import pack_spec
    from tasks.pretrain import pretrain_spec
    from tasks.sft import sft_spec

    store, out = ArtifactStore(cfg.store), RunModels()

    def lookup(stage: str, key: str, model: str) -> ArtifactRef | None:
        ref, problems = check(store, stage, key)
        if problems:
            moved = _quarantine(store, stage, key) if quarantine_corrupt else ""
            out.missing[model] = (
                f"{stage} {key[:12]} is corrupt ({'; '.join(problems)}){moved}; "
                "`fasttrack run` rebuilds it"
            )
        elif ref is None:
            out.missing.setdefault(model, f"not trained for this config (no {stage} {key[:12]})")
        return ref

    data = data or lookup("data", data_spec(cfg).key, "data")
    if data is None:
        raise FastTrackError(
            f"no data artifact for run {cfg.name!r} in {cfg.store}: run `fasttrack run` first"
        )
    found = out.found
    if (base := lookup("base", base_spec(cfg, data).key, "base")) is None:
        return _explain(cfg, out)
    found["base"] = start = base
    packed = lookup("pack", pack_spec(cfg, data, base).key, "pretrain")
    if packed and (pre := lookup("pretrain", pretrain_spec(cfg, packed, base).key, "pretrain")):
        found["pretrain"] = start = pre
    if (tuned := lookup("sft", sft_spec(cfg, start, data).key, "sft")) is None:
        return _explain(cfg, out)
    found["sft"] = tuned
    ref = lookup("dpo_ref", ref_spec(cfg, start, tuned, data).key, "dpo")
    if ref and (aligned := lookup("dpo", dpo_spec(cfg, start, tuned, ref, data).key, "dpo")):
        found["dpo"] = aligned
    return _explain(cfg, out)


def _explain(cfg: RunConfig, out: RunModels) -> RunModels:
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
