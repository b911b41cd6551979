"""Log-probabilities of answers under a chat model: completion loss and preference accuracy.

One function scores every model the same way (prompt through the chat template with the
generation prompt, answer = what the template renders after it, EOS included), so SFT loss and
preference accuracy are comparable across base, pretrained, SFT and DPO models.

Preference accuracy compares the *mean* log-prob per answer token (EOS included) of the chosen
and the rejected answer, not their sums. A summed log-prob is a product of per-token
probabilities, so it favours whichever answer is shorter: a truncated answer (a prefix of the
chosen one) then always wins and one that repeats itself always loses, whatever the model
learned (on the demo pairs every model scored the share of looping pairs, 0.629). The
length-normalised score is what lm-eval's `acc_norm` does for choices of unequal length (it
divides by bytes; per token is the unit the model predicts in) and the average log-likelihood
SimPO and ORPO take as a sequence's reward. Unlike DPO's implicit reward (log-ratio against a
reference model) it needs no reference, so every model of the chain, base included, is scored
alone and the same way. Its known bias runs the other way: cheap, predictable tokens (a
verbatim repetition) raise the mean, so a model that copies well can prefer a looping answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fasttrack.core.lazy import inference_mode, lazy

torch = lazy("torch")  # imported on first use: a cached run never needs it


@dataclass(frozen=True)
class Scored:
    logp: list[float]  # summed log-prob of each answer
    tokens: list[int]  # answer tokens scored per example


def prompt_ids(tok: Any, prompt: str) -> list[int]:
    """The chat-templated user turn ending with the assistant cue."""
    user = [{"role": "user", "content": prompt}]
    return tok.apply_chat_template(
        user, add_generation_prompt=True, tokenize=True, return_dict=False
    )


def answer_ids(tok: Any, prompt: str, p_ids: list[int], answer: str) -> list[int]:
    """What the template renders for `answer` after `prompt`'s ids `p_ids` (EOS included)."""
    full = tok.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
        tokenize=True,
        return_dict=False,
    )
    if full[: len(p_ids)] != p_ids:  # template not prefix-stable: fall back to concatenation
        return tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return full[len(p_ids) :]


def encode_pair(tok: Any, prompt: str, answer: str, max_length: int) -> tuple[list[int], int]:
    """(ids of prompt + answer, index where the answer starts), left-truncating the prompt."""
    p_ids = prompt_ids(tok, prompt)
    answer_part = answer_ids(tok, prompt, p_ids, answer)[: max_length - 1]
    keep = max(max_length - len(answer_part), 1)
    head = p_ids[-keep:]
    return head + answer_part, len(head)


@inference_mode
def score_answers(
    model: Any,
    tok: Any,
    prompts: list[str],
    answers: list[str],
    max_length: int,
    batch_size: int = 8,
) -> Scored:
    """Summed log-prob and token count of each answer given its prompt."""
    model.eval()
    device = next(model.parameters()).device
    pairs = [encode_pair(tok, p, a, max_length) for p, a in zip(prompts, answers, strict=True)]
    logps, counts = [], []
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        target = torch.zeros_like(ids, dtype=torch.bool)
        for row, (seq, start) in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            target[row, start : len(seq)] = True
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        token_lp = logprobs.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
        scored = target[:, 1:].to(device)
        logps.extend((token_lp * scored).sum(-1).double().cpu().tolist())
        counts.extend(scored.sum(-1).cpu().tolist())
    return Scored(logp=logps, tokens=counts)


def completion_loss(model: Any, tok: Any, prompts: list[str], answers: list[str], max_length: int):
    """Token-weighted mean NLL of the answers (the SFT objective on held-out pairs)."""
    s = score_answers(model, tok, prompts, answers, max_length)
    return -sum(s.logp) / max(sum(s.tokens), 1)


def per_token(s: Scored) -> list[float]:
    """Mean log-prob per scored answer token of each answer (EOS counts: an answer has >= 1)."""
    return [lp / max(n, 1) for lp, n in zip(s.logp, s.tokens, strict=True)]


def normalised_margins(chosen: Scored, rejected: Scored) -> list[float]:
    """Per pair: mean log-prob per token of the chosen minus that of the rejected answer (nats
    per token; > 0: the model prefers the chosen)."""
    return [c - r for c, r in zip(per_token(chosen), per_token(rejected), strict=True)]


def preference_margins(
    model: Any, tok: Any, rows: list[dict[str, str]], max_length: int
) -> list[float]:
    """Length-normalised margin of each pair (see the module docstring for why not summed)."""
    prompts = [r["prompt"] for r in rows]
    chosen = score_answers(model, tok, prompts, [r["chosen"] for r in rows], max_length)
    rejected = score_answers(model, tok, prompts, [r["rejected"] for r in rows], max_length)
    return normalised_margins(chosen, rejected)


def preference_accuracy(
    model: Any, tok: Any, rows: list[dict[str, str]], max_length: int
) -> dict[str, float]:
    """Share of pairs where the model gives the chosen answer the higher mean log-prob per
    token, and the mean margin (nats per token)."""
    return preference_summary(preference_margins(model, tok, rows, max_length))


def preference_summary(margins: list[float]) -> dict[str, float]:
    return {
        "pref_accuracy": round(sum(m > 0 for m in margins) / max(len(margins), 1), 5),
        "pref_margin": round(sum(margins) / max(len(margins), 1), 5),
    }
