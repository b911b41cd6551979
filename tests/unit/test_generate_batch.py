"""A prompt's answer does not depend on what it is batched with: the repetition penalty sees a
row's real tokens, never the left pads beside them (the pad id is often EOS)."""

from __future__ import annotations

import torch
from transformers import RepetitionPenaltyLogitsProcessor

from fasttrack.lib.generate import PadAwareRepetitionPenalty, unpadded_penalty

EOS = 2


def _rows() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    alone = torch.tensor([[5, 7, 5, 9]])
    padded = torch.tensor([[EOS, EOS, 5, 7, 5, 9], [4, 3, 8, 6, 1, 1]])  # left pads = EOS
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    return alone, padded, mask


def test_penalty_on_a_padded_row_equals_stock_penalty_on_the_row_alone() -> None:
    alone, padded, mask = _rows()
    scores = torch.randn(2, 12, generator=torch.Generator().manual_seed(0))
    stock = RepetitionPenaltyLogitsProcessor(1.5)
    ours = unpadded_penalty({"repetition_penalty": 1.5}, mask)["logits_processor"][0]
    got = ours(padded, scores.clone())
    assert torch.equal(got[0], stock(alone, scores[:1].clone())[0])
    assert torch.equal(got[1], stock(padded[1:], scores[1:].clone())[0])
    # the bug this replaces: stock penalises the pads, so EOS lost out in the batch only
    assert stock(padded, scores.clone())[0, EOS] != got[0, EOS]


def test_no_pads_or_no_penalty_leaves_generate_kwargs_stock() -> None:
    _, _, mask = _rows()
    assert unpadded_penalty({"repetition_penalty": 1.0}, mask) == {"repetition_penalty": 1.0}
    full = torch.ones(2, 6, dtype=torch.long)
    assert unpadded_penalty({"repetition_penalty": 1.3}, full) == {"repetition_penalty": 1.3}
    kw = unpadded_penalty({"repetition_penalty": 1.3}, mask)
    assert kw["repetition_penalty"] == 1.0
    assert isinstance(kw["logits_processor"][0], PadAwareRepetitionPenalty)
