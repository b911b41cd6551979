"""The server's dynamic batcher without a server: batched rows answer exactly as `generate`
does for each prompt alone (left padding, attention mask, position ids), stop strings, streams,
cancellation, grouping by decoding settings, and the 429 limit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fasttrack.core.config_eval import GenerationConfig
from fasttrack.lib.batcher import Batcher, Busy, Request, cut_at_stop
from fasttrack.lib.generate import chat_text, generate

PROMPTS = ["one", "two three four five six one two", "five", "six six one two three four five"]


@pytest.fixture(scope="module")
def model_tok(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fasttrack.lib.models import fix_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():  # a random init this small answers with one token; make it vary
        for p in model.parameters():
            p.normal_(0, 0.5)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    fix_tokenizer(tok, model.config)
    return model.eval(), tok


def ids_of(tok, prompt: str) -> list[int]:
    return tok(chat_text(tok, [{"role": "user", "content": prompt}]), add_special_tokens=False)[
        "input_ids"
    ]


def run_all(batcher: Batcher, reqs: list[Request]) -> list:
    futures = [batcher.submit(r) for r in reqs]  # queued before the worker starts: one batch
    batcher.start()
    try:
        return [f.result(timeout=120) for f in futures]
    finally:
        batcher.stop()


def test_batched_greedy_equals_each_prompt_alone(model_tok) -> None:
    model, tok = model_tok
    budgets = [6, 12, 3, 9]
    g = GenerationConfig(max_new_tokens=12)
    reqs = [
        Request(ids_of(tok, p), g.model_copy(update={"max_new_tokens": m}))
        for p, m in zip(PROMPTS, budgets, strict=True)
    ]
    assert len({len(r.ids) for r in reqs}) == len(reqs)  # every row needs different padding
    batcher = Batcher(model, tok)
    results = run_all(batcher, reqs)
    assert list(batcher.batches) == [len(PROMPTS)]  # one left-padded batch, not a loop
    for prompt, budget, (done,) in zip(PROMPTS, budgets, results, strict=True):
        alone = generate(model, tok, [prompt], g.model_copy(update={"max_new_tokens": budget}))[0]
        assert done.text == alone, prompt
        assert done.tokens <= budget
        assert done.text  # the model said something, so equality means something


def test_stop_strings_stream_and_cancel(model_tok) -> None:
    model, tok = model_tok
    g = GenerationConfig(max_new_tokens=12)
    full = generate(model, tok, [PROMPTS[1]], g)[0]
    stop = full.split()[2]  # a word in the middle of the greedy answer
    expected = cut_at_stop(full, [stop])[0].strip()
    streamed: list[str] = []
    with_stop = Request(ids_of(tok, PROMPTS[1]), g, stop=[stop],
                        on_delta=lambda i, text: streamed.append(text))  # fmt: skip
    cancelled = Request(ids_of(tok, PROMPTS[3]), g)
    cancelled.on_delta = lambda i, text: cancelled.cancelled.set()  # client gone after 1 delta
    plain = Request(ids_of(tok, PROMPTS[0]), g)
    stopped, gone, other = run_all(Batcher(model, tok), [with_stop, cancelled, plain])
    assert stopped[0].text == expected and stopped[0].finish_reason == "stop"
    assert "".join(streamed) == expected  # the deltas add up to the answer, stop excluded
    assert gone[0].tokens < 12  # its row stopped when the client went away
    assert other[0].text == generate(model, tok, [PROMPTS[0]], g)[0]  # neighbours unaffected


def test_decoding_settings_group_batches_and_seeded_samples_run_alone(model_tok) -> None:
    model, tok = model_tok
    greedy = GenerationConfig(max_new_tokens=5)
    sample = GenerationConfig(max_new_tokens=5, strategy="sample", temperature=1.5)
    reqs = [Request(ids_of(tok, p), greedy) for p in PROMPTS[:2]]
    reqs += [Request(ids_of(tok, PROMPTS[2]), sample, n=3)]
    reqs += [Request(ids_of(tok, PROMPTS[3]), sample, seed=11)]
    batcher = Batcher(model, tok)
    results = run_all(batcher, reqs)
    assert sorted(batcher.batches) == [1, 2, 3]  # greedy pair, the n=3 samples, the seeded one
    assert len(results[2]) == 3
    assert results[3][0].text == generate(model, tok, [PROMPTS[3]], sample, seed=11)[0]


def test_queue_limit_raises_busy(model_tok) -> None:
    model, tok = model_tok
    batcher = Batcher(model, tok, max_pending=2)
    g = GenerationConfig(max_new_tokens=2)
    futures = [batcher.submit(Request(ids_of(tok, "one"), g)) for _ in range(2)]
    with pytest.raises(Busy):
        batcher.submit(Request(ids_of(tok, "one"), g))
    batcher.start()
    assert all(f.result(timeout=60) for f in futures)
    batcher.submit(Request(ids_of(tok, "one"), g)).result(timeout=60)  # room again once done
    batcher.stop()
