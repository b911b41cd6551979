"""Generation with the configured decoding strategy, and the newest model of a run.

Batched generation pads on the left (decoder-only models continue from the last position), goes
through the chat template with the generation prompt, and stops at EOS; the decoding settings
are returned with the answers so every number can say how it was produced.
"""

from __future__ import annotations

from typing import Any

import torch

from tasks.config import GenerationConfig, RunConfig
from tasks.errors import FastTrackError
from tasks.integrity import checked_lookup
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


def chat_text(tok: Any, messages: list[dict[str, str]]) -> str:
    """The model's chat template over `messages`, ending with the assistant cue."""
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_room(model: Any, max_new_tokens: int) -> int | None:
    """Prompt tokens that fit beside `max_new_tokens` in the model's context (None: no limit)."""
    from tasks.models import max_positions

    limit = max_positions(model)
    return max(limit - max_new_tokens, 1) if limit else None


def encode_left(tok: Any, texts: list[str], room: int | None) -> Any:
    """Left-padded, left-truncated batch: the end (the question and the cue) is kept."""
    sides = tok.padding_side, tok.truncation_side
    tok.padding_side = tok.truncation_side = "left"
    try:
        return tok(
            texts,
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
            truncation=room is not None,
            max_length=room,
        )
    finally:
        tok.padding_side, tok.truncation_side = sides


def decode_answer(tok: Any, ids: Any) -> str:
    return tok.decode(ids, skip_special_tokens=True).strip()


@torch.inference_mode()
def generate(
    model: Any, tok: Any, prompts: list[str], g: GenerationConfig, seed: int = 0
) -> list[str]:
    """Answers to user prompts (chat template, left padding, stop at EOS)."""
    from tasks.adapters import disable_cpu_bf16_repack

    disable_cpu_bf16_repack(model)  # a no-grad forward on 4-bit CPU layers must not repack them
    texts = [chat_text(tok, [{"role": "user", "content": p}]) for p in prompts]
    batch = encode_left(tok, texts, prompt_room(model, g.max_new_tokens))
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    model.eval()
    out = model.generate(**batch.to(device), **generation_kwargs(g, tok))
    new = out[:, batch["input_ids"].shape[1] :]
    return [decode_answer(tok, ids) for ids in new]


def run_models(cfg: RunConfig, data: ArtifactRef | None = None) -> dict[str, ArtifactRef]:
    """The intact model artifacts this config's run has published (lookup only, nothing is
    built; a corrupt one counts as absent). `data`: the run's data ref, if already known."""
    from tasks.data import data_spec
    from tasks.dpo import dpo_spec, ref_spec
    from tasks.models import base_spec
    from tasks.packing import pack_spec
    from tasks.pretrain import pretrain_spec
    from tasks.sft import sft_spec

    store = ArtifactStore(cfg.store)

    def lookup(stage: str, key: str) -> ArtifactRef | None:
        return checked_lookup(store, stage, key)

    data = data or lookup("data", data_spec(cfg).key)
    if data is None:
        raise FastTrackError(
            f"no data artifact for run {cfg.name!r} in {cfg.store}: run `fasttrack run` first"
        )
    found: dict[str, ArtifactRef] = {}
    if (base := lookup("base", base_spec(cfg, data).key)) is None:
        return found
    found["base"] = base
    start = base
    packed = lookup("pack", pack_spec(cfg, data, base).key)
    if packed and (pre := lookup("pretrain", pretrain_spec(cfg, packed, base).key)):
        found["pretrain"] = start = pre
    if (tuned := lookup("sft", sft_spec(cfg, start, data).key)) is None:
        return found
    found["sft"] = tuned
    ref = lookup("dpo_ref", ref_spec(cfg, start, tuned, data).key)
    if ref and (aligned := lookup("dpo", dpo_spec(cfg, start, tuned, ref, data).key)):
        found["dpo"] = aligned
    return found


def newest_model(cfg: RunConfig) -> tuple[str, ArtifactRef]:
    """(stage, ref) of the most trained model of the run: DPO > SFT > pretrain > base."""
    models = run_models(cfg)
    for stage in MODEL_ORDER:
        if stage in models:
            return stage, models[stage]
    raise FastTrackError(
        f"no model artifact for run {cfg.name!r} in {cfg.store}: run `fasttrack run` first"
    )
