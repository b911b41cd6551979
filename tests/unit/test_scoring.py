"""Preference accuracy on the demo's two defects: the summed log-prob gets them wrong, the
length-normalised one right, under a language model that has learned the answers."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from fasttrack.lib.demo import rejected_answer
from fasttrack.lib.scoring import (
    encode_pair,
    normalised_margins,
    preference_margins,
    preference_summary,
    score_answers,
)

PROMPT = "What does `json.loads` do?"
ANSWER = "Deserialize a string instance containing a JSON document to a Python object."


class BigramLM(torch.nn.Module):
    """A count-based bigram language model (additive smoothing), fitted on token sequences:
    the smallest real model that has learned where an answer goes and where it ends."""

    def __init__(self, sequences: list[list[int]], vocab: int, alpha: float = 0.01) -> None:
        super().__init__()
        counts = torch.full((vocab, vocab), alpha)
        for seq in sequences:
            for a, b in zip(seq, seq[1:], strict=False):
                counts[a, b] += 1
        self.table = torch.nn.Parameter(counts.log(), requires_grad=False)  # logits

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


@pytest.fixture
def tok(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _trained(tok, answers: list[str]) -> BigramLM:
    return BigramLM([encode_pair(tok, PROMPT, a, 256)[0] for a in answers], len(tok))


def _summed_margins(model, tok, rows):
    prompts = [r["prompt"] for r in rows]
    c = score_answers(model, tok, prompts, [r["chosen"] for r in rows], 256)
    r = score_answers(model, tok, prompts, [r["rejected"] for r in rows], 256)
    return [a - b for a, b in zip(c.logp, r.logp, strict=True)]


def test_truncated_answer_wins_the_summed_metric_and_loses_the_normalised_one(tok) -> None:
    model = _trained(tok, [ANSWER])  # seen once: every token learned, but not with certainty
    row = {"prompt": PROMPT, "chosen": ANSWER, "rejected": rejected_answer(ANSWER, "truncated")}
    assert ANSWER.startswith(row["rejected"]) and row["rejected"] != ANSWER
    assert _summed_margins(model, tok, [row])[0] < 0  # the old metric prefers the prefix
    margin = preference_margins(model, tok, [row], 256)[0]
    assert margin > 0  # an end mid-sentence costs more per token than the rest of the answer
    assert preference_summary([margin])["pref_accuracy"] == 1.0


def test_looping_answer_loses_both_and_an_untrained_model_prefers_nothing(tok) -> None:
    model = _trained(tok, [ANSWER])
    row = {"prompt": PROMPT, "chosen": ANSWER, "rejected": rejected_answer(ANSWER, "looping")}
    assert _summed_margins(model, tok, [row])[0] > 0
    assert preference_margins(model, tok, [row], 256)[0] > 0
    uniform = BigramLM([], len(tok))  # every token equally likely: no preference per token
    rows = [row, {**row, "rejected": rejected_answer(ANSWER, "truncated")}]
    assert preference_margins(uniform, tok, rows, 256) == pytest.approx([0.0, 0.0], abs=1e-5)
    assert min(_summed_margins(uniform, tok, rows)) < 0 < max(_summed_margins(uniform, tok, rows))


def test_margins_are_differences_of_per_token_means() -> None:
    from fasttrack.lib.scoring import Scored

    chosen = Scored(logp=[-30.0, -4.0], tokens=[10, 2])
    rejected = Scored(logp=[-10.0, -8.0], tokens=[2, 2])
    assert normalised_margins(chosen, rejected) == pytest.approx([2.0, 2.0])
