"""Token-weighted strided perplexity (the Hugging Face "perplexity of fixed-length models" loop).

Windows start at 0, stride, 2*stride, ...; window ``begin`` covers ``ids[begin:end]`` with
``end = min(begin + max_length, N)`` and scores only its last ``end - prev_end`` tokens, the rest
being context. The loss is computed here from the logits and summed per token, so every scored
token weighs the same: averaging per-window means would over-weight the short last window, and
``outputs.loss * trg_len`` miscounts because of the causal label shift. A causal LM never scores
the first token of the stream, so with ``stride < max_length`` (or a single window) exactly
``N - 1`` tokens are scored, each once. With ``stride == max_length`` and several windows the first
token of each window has no context and cannot be scored, so ``tokens == N - windows``.

Speed (same numbers as the one-window loop; benchmarks/eval_perplexity.py): windows of one shape
are stacked with no padding (so no attention mask), the vocabulary projection and softmax run
only on the scored positions (half the window at the default stride; for a small model they cost
more than the decoder), and no KV cache is built.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import numpy as np

from fasttrack.core.lazy import lazy

torch = lazy("torch")  # imported on first use: a cached run never needs it


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
    token_nll: list[float] | None = None  # per input position when asked; NaN = not scored


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


def _shape_groups(windows: list[tuple[int, int, int]]) -> dict[tuple[int, int], list]:
    """Windows keyed by (length, scored targets): each group stacks with no padding and one slice.

    Only the first window (more targets) and the last one (shorter) differ from the rest, so
    batches need no attention mask (the causal fast path, as in the one-window loop) and waste
    no compute on pad tokens."""
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for begin, end, first in windows:
        groups.setdefault((end - begin, end - first), []).append((begin, end))
    return groups


def _accepts(model: torch.nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes ``name`` (a peft wrapper passing **kwargs to its base: if
    the base does)."""
    params = inspect.signature(model.forward).parameters
    if name in params:
        return True
    base = getattr(model, "get_base_model", None)
    forwards_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return callable(base) and forwards_kwargs and base() is not model and _accepts(base(), name)


def _forward_kwargs(model: torch.nn.Module) -> dict[str, int | bool]:
    """Checked once per call: no KV cache (a single forward never reads it back) and a
    ``logits_to_keep`` slot, each only when the model's forward takes it."""
    kwargs: dict[str, int | bool] = {}
    if _accepts(model, "use_cache"):
        kwargs["use_cache"] = False
    if _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 0  # set per batch by _last_logits
    return kwargs


def _last_logits(
    model: torch.nn.Module, batch: torch.Tensor, keep: int, kwargs: dict[str, int | bool]
) -> torch.Tensor:
    """Logits of the last ``keep`` positions, (B, keep, V).

    ``logits_to_keep`` makes the model's own forward slice the final hidden states before
    ``lm_head``, so whatever it does after the decoder (tied embeddings, Gemma's final logit
    softcapping, output scaling) still applies while the vocabulary projection and softmax run
    only on the scored positions. Models without it (or ignoring it) get full logits, sliced.
    """
    if "logits_to_keep" in kwargs:
        kwargs = {**kwargs, "logits_to_keep": keep}
    logits = model(input_ids=batch, **kwargs).logits
    return logits[:, -keep:] if logits.size(1) != keep else logits


def _nll_rows(logits: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """Token NLL in float64, one window at a time: the fp32 upcast of bf16 logits stays one
    (T, V) slice, never the whole (B, T, V) batch."""
    return [
        torch.nn.functional.cross_entropy(row.float(), target, reduction="none").double()
        for row, target in zip(logits, labels, strict=True)
    ]


def strided_perplexity(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    max_length: int,
    stride: int,
    batch_size: int = 8,
    text_bytes: int | None = None,
    device: str | torch.device | None = None,
    per_token: bool = False,
) -> PerplexityResult:
    """Perplexity of ``input_ids`` (1-D token stream) under a causal LM, strided as in HF docs.
    ``per_token`` also returns each position's NLL (so callers can total it per document)."""
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
    kwargs = _forward_kwargs(model)
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    token_nll = torch.full((n,), math.nan, dtype=torch.float64) if per_token else None
    with torch.inference_mode():
        for (length, n_targets), group in _shape_groups(windows).items():
            for i in range(0, len(group), batch_size):
                spans = group[i : i + batch_size]
                batch = torch.stack([ids[begin:end] for begin, end in spans])
                logits = _last_logits(model, batch, n_targets + 1, kwargs)[:, :-1]
                rows = _nll_rows(logits, batch[:, length - n_targets :])
                for (_, end), nll in zip(spans, rows, strict=True):
                    nll_sum += nll.sum()
                    if token_nll is not None:
                        token_nll[end - n_targets : end] = nll.cpu()
                tokens += batch.size(0) * n_targets
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
        token_nll=None if token_nll is None else token_nll.tolist(),
    )


def token_stream(texts: list[str], tokenizer, max_tokens: int | None) -> tuple[torch.Tensor, int]:
    """(ids of whole documents, each [BOS +] text + EOS, up to max_tokens; UTF-8 bytes of those
    documents). BOS as in packing: where the tokenizer starts texts with one."""
    ids, _, doc_bytes = token_documents(texts, tokenizer, max_tokens)
    return ids, sum(doc_bytes)


def token_documents(
    texts: list[str], tokenizer, max_tokens: int | None
) -> tuple[torch.Tensor, list[int], list[int]]:
    """token_stream's ids plus each kept document's token count and UTF-8 bytes, in order (the
    units a per-document bootstrap resamples)."""
    from fasttrack.core.templates import document_bos

    head = [] if (bos := document_bos(tokenizer)) is None else [bos]
    ids: list[int] = []
    lengths: list[int] = []
    doc_bytes: list[int] = []
    for text in texts:
        body = tokenizer(text, add_special_tokens=False)["input_ids"]
        doc = head + body + [tokenizer.eos_token_id]
        if max_tokens and ids and len(ids) + len(doc) > max_tokens:
            break
        doc = doc[:max_tokens] if max_tokens else doc
        ids.extend(doc)
        lengths.append(len(doc))
        doc_bytes.append(len(text.encode("utf-8")))
    return torch.tensor(ids, dtype=torch.long), lengths, doc_bytes


def per_document(
    token_nll: list[float], lengths: list[int], doc_bytes: list[int]
) -> list[list[float]]:
    """[NLL, scored tokens, bytes] of each document from per-position NLL (NaN: not scored)."""
    nll = np.asarray(token_nll, dtype=np.float64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int)
    scored = ~np.isnan(nll)
    sums = np.add.reduceat(np.where(scored, nll, 0.0), starts)
    counts = np.add.reduceat(scored.astype(np.int64), starts)
    return [[float(s), int(c), b] for s, c, b in zip(sums, counts, doc_bytes, strict=True)]
