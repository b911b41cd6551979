"""Token-weighted strided perplexity (the Hugging Face "perplexity of fixed-length models" loop).

Windows start at 0, stride, 2*stride, ...; window ``begin`` covers ``ids[begin:end]`` with
``end = min(begin + max_length, N)`` and scores only its last ``end - prev_end`` tokens, the rest
being context. The loss is computed here from the logits and summed per token, so every scored
token weighs the same: averaging per-window means would over-weight the short last window, and
``outputs.loss * trg_len`` miscounts because of the causal label shift. A causal LM never scores
the first token of the stream, so with ``stride < max_length`` (or a single window) exactly
``N - 1`` tokens are scored, each once. With ``stride == max_length`` and several windows the first
token of each window has no context and cannot be scored, so ``tokens == N - windows``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float  # exp(nll_sum / tokens)
    nll_sum: float  # total negative log-likelihood in nats over all scored tokens
    tokens: int  # number of target tokens scored
    bytes: int | None  # UTF-8 byte count of the scored text if given, else None
    bits_per_byte: float | None  # nll_sum / ln(2) / bytes when bytes given
    max_length: int
    stride: int
    windows: int


def _windows(n: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) per window; targets are ids[first_target:end]."""
    out: list[tuple[int, int, int]] = []
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        out.append((begin, end, max(prev_end, begin + 1)))  # begin itself has no context
        prev_end = end
        if end == n:
            break
    return out


def strided_perplexity(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    max_length: int,
    stride: int,
    batch_size: int = 8,
    text_bytes: int | None = None,
    device: str | torch.device | None = None,
) -> PerplexityResult:
    """Perplexity of ``input_ids`` (1-D token stream) under a causal LM, strided as in HF docs."""
    if input_ids.dim() == 2 and input_ids.size(0) == 1:
        input_ids = input_ids[0]
    if input_ids.dim() != 1:
        raise ValueError(
            f"input_ids must be a 1-D token stream, got shape {tuple(input_ids.shape)}"
        )
    n = int(input_ids.numel())
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if not 1 <= stride <= max_length:
        raise ValueError(
            f"stride must satisfy 1 <= stride <= max_length ({max_length}), got {stride}"
        )
    if n < 2:
        raise ValueError(f"need at least 2 tokens to score anything, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if text_bytes is not None and text_bytes <= 0:
        raise ValueError(f"text_bytes must be positive when given, got {text_bytes}")
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(max_pos, int) and max_length > max_pos:
        raise ValueError(f"max_length {max_length} exceeds max_position_embeddings {max_pos}")

    if device is None:
        device = next(model.parameters()).device
    model.eval()
    model.to(device)
    ids = input_ids.to(device=device, dtype=torch.long)
    windows = _windows(n, max_length, stride)
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    with torch.inference_mode():
        for i in range(0, len(windows), batch_size):
            chunk = windows[i : i + batch_size]
            width = max(end - begin for begin, end, _ in chunk)
            batch = torch.zeros((len(chunk), width), dtype=torch.long, device=device)
            attn = torch.zeros_like(batch)
            target = torch.zeros((len(chunk), width), dtype=torch.bool, device=device)
            for row, (begin, end, first) in enumerate(chunk):
                batch[row, : end - begin] = ids[begin:end]
                attn[row, : end - begin] = 1
                target[row, first - begin : end - begin] = True
            logits = model(input_ids=batch, attention_mask=attn).logits
            # logits at position p predict token p + 1; select only the target positions.
            mask = target[:, 1:]
            picked = logits[:, :-1][mask].float()
            labels = batch[:, 1:][mask]
            logp = torch.log_softmax(picked, dim=-1).gather(-1, labels[:, None]).squeeze(-1)
            nll_sum -= logp.double().sum()
            tokens += int(mask.sum())
    nll = float(nll_sum)
    bpb = None if text_bytes is None else nll / math.log(2) / text_bytes
    return PerplexityResult(
        perplexity=math.exp(nll / tokens),
        nll_sum=nll,
        tokens=tokens,
        bytes=text_bytes,
        bits_per_byte=bpb,
        max_length=max_length,
        stride=stride,
        windows=len(windows),
    )
