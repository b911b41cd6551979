"""Generation with the configured decoding strategy.

Batched generation pads on the left (decoder-only models continue from the last position), goes
through the chat template with the generation prompt, and stops at the model's own stop tokens
(EOS, the generation config's, the template's end of turn); the decoding settings
are returned with the answers so every number can say how it was produced.
"""

from __future__ import annotations

from typing import Any

from fasttrack.core.config_eval import GenerationConfig
from fasttrack.core.lazy import inference_mode, lazy

torch = lazy("torch")  # imported on first use: a cached run never needs it


def generation_kwargs(g: GenerationConfig, tok: Any, model: Any = None) -> dict[str, Any]:
    """transformers `generate` kwargs for greedy, sampling (top-k/top-p/temperature) or beam.
    Stops at every id the model stops at: EOS, its generation config's ids, the template's
    end-of-turn token (passing only EOS ran Gemma past `<end_of_turn>`)."""
    from fasttrack.core.templates import stop_ids

    kwargs: dict[str, Any] = {
        "max_new_tokens": g.max_new_tokens,
        "repetition_penalty": g.repetition_penalty,
        "eos_token_id": stop_ids(tok, model),
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


class PadAwareRepetitionPenalty:
    """transformers' repetition penalty, blind to left padding: stock `generate` penalises every
    id in `input_ids`, pads included, so a batched prompt beside a longer one had its pad id
    (often EOS) penalised and answered differently than alone."""

    def __init__(self, penalty: float, pads: torch.Tensor) -> None:
        self.penalty, self.pads = penalty, pads  # pads: left-pad count per row

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        pads = self.pads.to(input_ids.device)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        first = input_ids.gather(1, pads.clamp(max=input_ids.shape[1] - 1)[:, None])
        ids = torch.where(pos[None, :] >= pads[:, None], input_ids, first)  # pads -> a real id
        score = scores.gather(1, ids)
        score = torch.where(score < 0, score * self.penalty, score / self.penalty)
        return scores.scatter(1, ids, score)


def unpadded_penalty(kwargs: dict[str, Any], attention_mask: torch.Tensor) -> dict[str, Any]:
    """`kwargs` with the repetition penalty applied only to real tokens of a left-padded batch."""
    penalty = kwargs.get("repetition_penalty", 1.0)
    if penalty == 1.0 or bool(attention_mask.all()):
        return kwargs
    from transformers import LogitsProcessorList

    pads = (attention_mask == 0).sum(dim=1)
    processors = LogitsProcessorList([PadAwareRepetitionPenalty(float(penalty), pads)])
    return kwargs | {"repetition_penalty": 1.0, "logits_processor": processors}


def chat_text(tok: Any, messages: list[dict[str, str]]) -> str:
    """The model's chat template over `messages`, ending with the assistant cue."""
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_room(model: Any, max_new_tokens: int) -> int | None:
    """Prompt tokens that fit beside `max_new_tokens` in the model's context (None: no limit)."""
    from fasttrack.lib.models import max_positions

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


@inference_mode
def generate(
    model: Any, tok: Any, prompts: list[str], g: GenerationConfig, seed: int = 0
) -> list[str]:
    """Answers to user prompts (chat template, left padding, stop at the model's stop tokens)."""
    from fasttrack.lib.adapters import disable_cpu_bf16_repack

    disable_cpu_bf16_repack(model)  # a no-grad forward on 4-bit CPU layers must not repack them
    texts = [chat_text(tok, [{"role": "user", "content": p}]) for p in prompts]
    batch = encode_left(tok, texts, prompt_room(model, g.max_new_tokens))
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    model.eval()
    batch = batch.to(device)
    kwargs = unpadded_penalty(generation_kwargs(g, tok, model), batch["attention_mask"])
    out = model.generate(**batch, **kwargs)
    new = out[:, batch["input_ids"].shape[1] :]
    return [decode_answer(tok, ids) for ids in new]
