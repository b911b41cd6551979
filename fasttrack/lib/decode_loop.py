"""Iteration-level (continuous) batching: the rows decoding together, one token per forward.

`Slots` holds the live rows, their shared left-padded KV cache (transformers' `DynamicCache`)
and attention mask. New prompts are prefilled together in one forward and their cache is
merged into the running one (both padded on the left to the same width); every `step` feeds
each row its last token with its own position id, so a row computes what `generate` computes
for its prompt alone. A finished row leaves at once (its cache row is dropped and columns that
only padding uses are trimmed), so a short request never waits for a long neighbour.

Each row applies its own logits processors (the ones `generate` builds from the model's
generation config and the request's settings, over that row's own tokens; rows sharing a list
are processed in one call when that is exact, see `row_wise`) and samples with its own
`torch.Generator`: neither greedy nor seeded output depends on what else is in flight.
transformers' own continuous batching (`generate_batch`) drops `RepetitionPenaltyLogitsProcessor`
(not supported there), which the configured decoding uses, so it cannot give `generate`'s answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass
class Live:
    """One decoding row: its tokens so far (prompt + generated), processors and RNG."""

    ids: list[int]
    processors: LogitsProcessorList
    sample: bool
    generator: torch.Generator | None
    owner: Any = None  # the caller's handle for this row
    next_token: int | None = None


def row_processors(model: Any, kwargs: dict[str, Any], prompt_len: int) -> LogitsProcessorList:
    """The logits processors `model.generate(**kwargs)` would apply to this prompt alone
    (the model's generation config merged with the request's settings)."""
    gen_config, _ = model._prepare_generation_config(None, **kwargs)
    return model._get_logits_processor(
        generation_config=gen_config,
        input_ids_seq_length=prompt_len,
        encoder_input_ids=None,
        device=str(model.device),
        model_kwargs={},
    )


def can_step(model: Any) -> bool:
    """True when `generate` would cache this model in `DynamicLayer`s (full or sliding
    attention): `Slots` keeps them whole, then pads, merges and trims them. Recurrent, hybrid
    and encoder-decoder models are answered by `generate` instead."""
    from transformers.cache_utils import DynamicLayer

    if getattr(model.config, "is_encoder_decoder", False):
        return False
    try:
        layers = DynamicCache(config=model.config).layers
    except Exception:  # noqa: BLE001 - a cache transformers cannot build here: not steppable
        return False
    return all(isinstance(layer, DynamicLayer) for layer in layers)


ROW_WISE = (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
            TopPLogitsWarper, MinPLogitsWarper)  # fmt: skip


def row_wise(processors: LogitsProcessorList) -> bool:
    """True when each row's result depends only on that row's scores and the set of its
    tokens, so one call over a batch padded with each row's own first token is exact."""
    return all(
        isinstance(p, ROW_WISE) and getattr(p, "prompt_ignore_length", None) is None
        for p in processors
    )


def _own_padded(rows: list[list[int]]) -> torch.Tensor:
    """Token rows padded on the left with their own first token (a token already in the row:
    the repetition penalty penalises each distinct token once, so the padding changes nothing)."""
    width = max(len(r) for r in rows)
    return torch.tensor([[r[0]] * (width - len(r)) + r for r in rows], dtype=torch.long)


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    extra = width - t.shape[dim]
    if extra <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class Slots:
    """The running batch. Not thread-safe: one worker thread owns it (and the model)."""

    def __init__(self, model: Any):
        self.model = model
        self.device = next(model.parameters()).device
        self.rows: list[Live] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (rows, width), 0 where a row is padded

    def __len__(self) -> int:
        return len(self.rows)

    def admit(self, new: list[Live]) -> None:
        """Prefill `new` rows in one forward, pick each one's first token, join the batch."""
        width = max(len(r.ids) for r in new)
        ids = torch.zeros((len(new), width), dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        for i, r in enumerate(new):
            ids[i, width - len(r.ids) :] = torch.tensor(r.ids, dtype=torch.long)
            mask[i, width - len(r.ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=positions.to(self.device), past_key_values=cache,
                         use_cache=True, logits_to_keep=1)  # fmt: skip
        self._choose(new, out.logits[:, -1])
        self._merge(new, cache, mask.to(self.device))

    def step(self) -> None:
        """One forward over every row's last token; each row picks its next one."""
        last = torch.tensor([[r.next_token] for r in self.rows], dtype=torch.long)
        positions = torch.tensor([[len(r.ids) - 1] for r in self.rows], dtype=torch.long)
        assert self.mask is not None
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        out = self.model(input_ids=last.to(self.device), attention_mask=self.mask,
                         position_ids=positions.to(self.device), past_key_values=self.cache,
                         use_cache=True)  # fmt: skip
        self._choose(self.rows, out.logits[:, -1])

    def retire(self, done: list[Live]) -> None:
        """Drop finished rows from the batch and trim columns only padding still uses."""
        if not done:
            return
        gone = {id(r) for r in done}
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache, self.mask = None, None
            return
        assert self.cache is not None and self.mask is not None
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.mask = self.mask[index]
        used = self.mask.any(0)  # left padding: a column in use stays in use to the right
        cut = int(used.int().argmax()) if bool(used.any()) else self.mask.shape[1]
        self.mask = self.mask[:, cut:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, cut:]
            layer.values = layer.values[index, :, cut:]

    def _choose(self, rows: list[Live], logits: torch.Tensor) -> None:
        scores = logits.to(dtype=torch.float32)
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(rows):  # rows sharing a processor list are processed together
            groups.setdefault(id(r.processors), []).append(i)
        for idx in groups.values():
            procs = rows[idx[0]].processors
            if row_wise(procs):
                scores[idx] = procs(_own_padded([rows[i].ids for i in idx]), scores[idx])
            else:
                for i in idx:
                    ids = torch.tensor([rows[i].ids], dtype=torch.long)
                    scores[i] = procs(ids, scores[i : i + 1])[0]
        tokens = torch.argmax(scores, dim=-1).tolist()
        for i, r in enumerate(rows):
            if r.sample:
                probs = torch.nn.functional.softmax(scores[i : i + 1], dim=-1)
                tokens[i] = int(torch.multinomial(probs, 1, generator=r.generator)[0, 0])
            r.next_token = tokens[i]
            r.ids.append(tokens[i])

    def _merge(self, new: list[Live], cache: DynamicCache, mask: torch.Tensor) -> None:
        if self.cache is None or not self.rows:
            self.rows, self.cache, self.mask = list(new), cache, mask
            return
        assert self.mask is not None
        # the running rows already hold the token they will feed next; the new rows too
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat(
                [_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2)]
            )
            mine.values = torch.cat(
                [_pad_left(mine.values, width, 2), _pad_left(theirs.values, width, 2)]
            )
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        self.rows += new
