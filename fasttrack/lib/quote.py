"""Quoted RAG answers (`rag.answer: quote`): the answer is the sentence of the retrieved context
that the model itself finds the likeliest answer, returned verbatim with the hit it came from.

Why: a grounded mode whose answers cannot say anything the cited sources do not say is what
users who must not hallucinate ask for, and it is the only way a model as small as the embedded
default's (0.8M parameters, minutes of training) answers from its sources at all: taught to copy
with retrieval-augmented SFT it loops instead (benchmarks/results/raft_variants_loaded.json).
The model still decides: every candidate sentence of the chunks that fit the prompt is scored as
the assistant's answer to the very prompt `ask` and `serve` build (mean log-prob per answer
token, EOS included, as preference accuracy scores answers), so a better-tuned model picks
better sentences. The prompt runs once per question and its KV cache is shared by all the
candidates, so scoring costs about one short forward pass per candidate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fasttrack.core.lazy import inference_mode, lazy
from fasttrack.lib.scoring import answer_ids, prompt_ids

torch = lazy("torch")  # imported on first use: a cached run never needs it

# A sentence ends at . ! or ? followed by whitespace, or at a blank line (titles, code).
_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9`'\"(\[])|\n\s*\n")
MIN_WORDS = 3  # "Usage:" or a bare title is not an answer


@dataclass(frozen=True)
class Quote:
    text: str  # the chosen sentence, verbatim (whitespace runs folded)
    hit: int  # index of the hit (0 = best ranked) it was taken from
    score: float  # its mean log-prob per token under the model


def sentences(text: str) -> list[str]:
    """The sentences of a chunk, whitespace folded (line-wrapped docstrings read as one line)."""
    parts = (" ".join(p.split()) for p in _BREAK.split(text))
    return [p for p in parts if len(p.split()) >= MIN_WORDS]


def candidates(hits: list[Any]) -> list[tuple[int, str]]:
    """(hit index, sentence) of every distinct sentence of `hits`, best-ranked hit first."""
    seen: set[str] = set()
    out = []
    for i, hit in enumerate(hits):
        for s in sentences(hit.text):
            if s not in seen:
                seen.add(s)
                out.append((i, s))
    return out


def _repeat(cache: Any, n: int) -> Any:
    """The prompt's KV cache for a batch of `n` candidates (a copy: the batch appends to it)."""
    import copy

    out = copy.deepcopy(cache)
    out.batch_repeat_interleave(n)
    return out


@inference_mode
def score_after_prompt(
    model: Any, prompt_ids: list[int], answers: list[list[int]], batch_size: int = 32
) -> list[float]:
    """Mean log-prob per token of each answer (token ids) right after `prompt_ids`. The prompt
    but its last token goes through the model once; each batch of answers continues from a copy
    of that cache, fed the prompt's last token first so the first logits predict answer[0].
    Answers are right-padded: causal attention keeps pads out of the real positions' view."""
    device = next(model.parameters()).device
    head = torch.tensor([prompt_ids[:-1]], device=device)
    cache = model(input_ids=head, use_cache=True).past_key_values if len(prompt_ids) > 1 else None
    scores: list[float] = []
    for i in range(0, len(answers), batch_size):
        chunk = answers[i : i + batch_size]
        width = 1 + max(len(a) for a in chunk)
        ids = torch.full((len(chunk), width), prompt_ids[-1], dtype=torch.long)
        for row, a in enumerate(chunk):
            ids[row, 1 : 1 + len(a)] = torch.tensor(a)
        past = _repeat(cache, len(chunk)) if cache is not None else None
        logits = model(input_ids=ids.to(device), past_key_values=past, use_cache=True).logits
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        token_lp = logprobs.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
        for row, a in enumerate(chunk):
            scores.append(float(token_lp[row, : len(a)].mean()))
    return scores


def encode_candidates(
    tok: Any, prompt: str, texts: list[str], room: int | None
) -> tuple[list[int], list[list[int]]]:
    """The prompt's ids (templated once, cut on the left to `room` tokens as generation cuts
    it) and each candidate's ids as the template renders it for the answer (EOS included)."""
    head = prompt_ids(tok, prompt)
    answers = [answer_ids(tok, prompt, head, t) for t in texts]
    return (head[-room:] if room else head), answers


def score_sentences(
    model: Any, tok: Any, prompt: str, texts: list[str], room: int | None = None
) -> list[float]:
    """Mean log-prob per token of each text as the model's answer to `prompt`."""
    head, answers = encode_candidates(tok, prompt, texts, room)
    return score_after_prompt(model, head, answers)


def quote_answer(
    model: Any,
    tok: Any,
    prompt: str,
    hits: list[Any],
    max_new_tokens: int,
    room: int | None = None,
) -> Quote | None:
    """The best-scored sentence of `hits` as the answer to `prompt` (the chat-templated RAG
    prompt's user turn); None when the hits hold no sentence of >= MIN_WORDS words.
    Sentences longer than `max_new_tokens` tokens are not candidates (generation could not
    have produced them either), unless no sentence is shorter. The prompt is cut on the left
    to `room` tokens, as generation cuts it."""
    from fasttrack.lib.adapters import disable_cpu_bf16_repack

    found = candidates(hits)
    if not found:
        return None
    disable_cpu_bf16_repack(model)  # a no-grad forward on 4-bit CPU layers must not repack them
    model.eval()
    head, answers = encode_candidates(tok, prompt, [s for _, s in found], room)
    fits = [i for i, a in enumerate(answers) if len(a) <= max_new_tokens] or range(len(found))
    scores = score_after_prompt(model, head, [answers[i] for i in fits])
    best = max(range(len(scores)), key=lambda j: (scores[j], -j))  # ties: the better-ranked hit
    hit, text = found[fits[best]]
    return Quote(text, hit, scores[best])
