"""Quoted RAG answers: candidates are the hits' sentences, the cached scoring equals a plain
forward pass over prompt + answer, and the answer is the model's best-scored sentence, verbatim."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from fasttrack.lib.ask import build_prompt, quoted
from fasttrack.lib.quote import candidates, quote_answer, score_after_prompt, sentences
from fasttrack.lib.retrieval import Hit
from fasttrack.lib.scoring import encode_pair, per_token, score_answers

DOC = (
    "json.loads\n\nDeserialize ``s`` (a ``str``, ``bytes`` or ``bytearray``\ninstance "
    "containing a JSON document) to a Python object.\n\nIf ``s`` is a str, it is used as is. "
    "Usage:\n\n    json.loads('[1]')"
)


@pytest.fixture(scope="module")
def lm(tiny_model_dir: Path):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=1024, pad_token_id=tok.pad_token_id)
    ).eval()  # fmt: skip
    return model, tok


def _hit(title: str, text: str) -> Hit:
    return Hit(chunk_id=0, doc_id=title, title=title, section="", text=text, score=1.0, rank=1)


def test_sentences_fold_wrapped_lines_and_drop_fragments() -> None:
    assert sentences(DOC) == [
        "Deserialize ``s`` (a ``str``, ``bytes`` or ``bytearray`` instance containing a JSON "
        "document) to a Python object.",
        "If ``s`` is a str, it is used as is.",
    ]  # the title, "Usage:" and the code line have fewer than 3 words
    assert sentences("Return an x. Return a y.\n\nReturn an x.") == [
        "Return an x.",
        "Return a y.",
        "Return an x.",
    ]


def test_candidates_are_distinct_and_remember_their_hit() -> None:
    hits = [_hit("a", "Return an x. Return the y value."), _hit("b", "Return an x. Build a z.")]
    assert candidates(hits) == [(0, "Return an x."), (0, "Return the y value."),
                                (1, "Build a z.")]  # fmt: skip


def test_cached_scores_equal_a_plain_forward_pass(lm) -> None:
    model, tok = lm
    prompt = build_prompt("What does `json.loads` do?", [_hit("json.loads", DOC)])
    answers = ["Deserialize a document.", "It is used as is, a str.", "x"]
    encoded = [encode_pair(tok, prompt, a, 1 << 30) for a in answers]
    prompt_ids = encoded[0][0][: encoded[0][1]]
    cached = score_after_prompt(model, prompt_ids, [ids[s:] for ids, s in encoded], batch_size=2)
    plain = per_token(score_answers(model, tok, [prompt] * 3, answers, 1 << 30))
    assert cached == pytest.approx(plain, abs=1e-4)


def test_the_answer_is_the_best_scored_sentence_verbatim(lm) -> None:
    model, tok = lm
    hits = [_hit("json.loads", DOC), _hit("json.dumps", "Serialize ``obj`` to a JSON str. Ok.")]
    prompt = build_prompt("What does `json.loads` do?", hits)
    q = quote_answer(model, tok, prompt, hits, max_new_tokens=64)
    found = candidates(hits)
    brute = per_token(score_answers(model, tok, [prompt] * len(found),
                                    [s for _, s in found], 1 << 30))  # fmt: skip
    best = max(range(len(found)), key=lambda i: brute[i])
    assert q is not None and (q.hit, q.text) == found[best]
    assert q.score == pytest.approx(brute[best], abs=1e-4)
    assert q.text in " ".join(hits[q.hit].text.split())
    assert quoted(model, tok, prompt, hits, 64, None) == f"{q.text} [{q.hit + 1}]"


def test_long_sentences_lose_to_any_that_fits_and_no_sentence_gives_no_answer(lm) -> None:
    model, tok = lm
    long = "Word " * 80 + "end."
    hits = [_hit("a", long + " Short enough sentence here.")]
    prompt = build_prompt("q?", hits)
    assert quote_answer(model, tok, prompt, hits, max_new_tokens=16).text == (
        "Short enough sentence here."
    )
    bare = [_hit("a", "Usage:\n\n    f(x)")]
    assert quote_answer(model, tok, build_prompt("q?", bare), bare, 16) is None
    assert quoted(model, tok, build_prompt("q?", bare), bare, 16, None) == ""
