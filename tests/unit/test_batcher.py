"""The server's continuous batcher without a server: rows stepped together answer exactly as
`generate` does for each prompt alone (left padding, attention mask, position ids, per-row
logits processors and RNG), a request admitted mid-flight finishes before a longer one that
started earlier, stop strings, streams, cancellation, beam search through `generate`, and the
429 limit."""

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
    assert batcher.stepping and max(batcher.batches) == len(PROMPTS)  # stepped together
    assert batcher.batches[-1] == 1  # finished rows left the batch
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


def test_mixed_decoding_settings_share_forwards_and_seeded_samples_equal_generate(
    model_tok,
) -> None:
    model, tok = model_tok
    greedy = GenerationConfig(max_new_tokens=5)
    sample = GenerationConfig(max_new_tokens=5, strategy="sample", temperature=1.5)
    reqs = [Request(ids_of(tok, p), greedy) for p in PROMPTS[:2]]
    reqs += [Request(ids_of(tok, PROMPTS[2]), sample, n=3)]
    reqs += [Request(ids_of(tok, PROMPTS[3]), sample, seed=11)]
    batcher = Batcher(model, tok)
    results = run_all(batcher, reqs)
    assert max(batcher.batches) == 6  # 2 greedy rows, 3 samples, the seeded one: one forward
    assert len(results[2]) == 3
    assert results[0][0].text == generate(model, tok, [PROMPTS[0]], greedy)[0]
    assert results[3][0].text == generate(model, tok, [PROMPTS[3]], sample, seed=11)[0]


def test_request_admitted_mid_flight_finishes_first(model_tok) -> None:
    """Continuous batching: a short request sent while a long one is decoding joins the running
    batch at the next step and is answered when its own budget is spent (the old batcher made
    it wait for the whole long batch); both still answer as `generate` alone."""
    model, tok = model_tok
    long_g, short_g = GenerationConfig(max_new_tokens=40), GenerationConfig(max_new_tokens=3)
    probe = run_all(Batcher(model, tok), [Request(ids_of(tok, p), long_g) for p in PROMPTS])
    lengths = [done.tokens for (done,) in probe]
    longest = PROMPTS[lengths.index(max(lengths))]  # the prompt this model answers longest
    batcher = Batcher(model, tok).start()
    order: list[str] = []
    short = Request(ids_of(tok, PROMPTS[0]), short_g)

    def send_short(i: int, text: str) -> None:  # the worker thread, while `long` decodes
        if not sent:
            sent.append(i)
            batcher.submit(short).add_done_callback(lambda _: order.append("short"))

    sent: list[int] = []
    long = Request(ids_of(tok, longest), long_g, on_delta=send_short)
    try:
        batcher.submit(long).add_done_callback(lambda _: order.append("long"))
        (long_done,), (short_done,) = long.future.result(timeout=120), short.future.result(60)
    finally:
        batcher.stop()
    assert long_done.tokens >= 12  # it ran well past the short one's budget
    assert order == ["short", "long"]
    assert 2 in batcher.batches  # they shared forwards
    assert long_done.text == generate(model, tok, [longest], long_g)[0]
    assert short_done.text == generate(model, tok, [PROMPTS[0]], short_g)[0]


def test_beam_search_goes_through_generate(model_tok) -> None:
    model, tok = model_tok
    beam = GenerationConfig(max_new_tokens=6, strategy="beam", num_beams=3)
    greedy = GenerationConfig(max_new_tokens=6)
    reqs = [Request(ids_of(tok, PROMPTS[1]), beam), Request(ids_of(tok, PROMPTS[2]), greedy)]
    beamed, plain = run_all(Batcher(model, tok), reqs)
    assert beamed[0].text == generate(model, tok, [PROMPTS[1]], beam)[0]
    assert plain[0].text == generate(model, tok, [PROMPTS[2]], greedy)[0]


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
