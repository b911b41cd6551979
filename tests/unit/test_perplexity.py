import math

import pytest
import torch
import transformers

from tasks.perplexity import PerplexityResult, strided_perplexity

N = 150


@pytest.fixture(scope="module")
def model() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 97, (N,), generator=torch.Generator().manual_seed(1))


def _token_nll(model, context_and_token: torch.Tensor) -> float:
    """-log p(last token | all previous tokens), float64."""
    with torch.inference_mode():
        logits = model(context_and_token[None]).logits[0, -2].double()
    return -float(torch.log_softmax(logits, -1)[context_and_token[-1]])


def _hf_docs_reference(model, ids: torch.Tensor, max_length: int, stride: int):
    """The HF docs loop, one window at a time, with the exact scored-token count."""
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    seq = ids[None]
    for begin in range(0, seq.size(1), stride):
        end = min(begin + max_length, seq.size(1))
        trg_len = end - prev_end
        input_ids = seq[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.inference_mode():
            loss = model(input_ids, labels=target_ids).loss
        num_loss_tokens = int((target_ids[:, 1:] != -100).sum())  # after the internal shift
        nll_sum += float(loss) * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end = end
        if end == seq.size(1):
            break
    return nll_sum, n_tokens


def test_single_window_matches_hand_computation(model, ids):
    x = ids[:60]
    res = strided_perplexity(model, x, max_length=64, stride=64)
    with torch.inference_mode():
        logp = torch.log_softmax(model(x[None]).logits[0].double(), -1)
    nll = -logp[:-1].gather(-1, x[1:, None]).sum().item()
    assert isinstance(res, PerplexityResult)
    assert res.windows == 1 and res.tokens == len(x) - 1
    assert res.perplexity == pytest.approx(math.exp(nll / (len(x) - 1)), rel=1e-4)
    assert res.nll_sum == pytest.approx(nll, rel=1e-4)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_strided_matches_hf_docs_loop(model, ids, batch_size):
    ref_nll, ref_tokens = _hf_docs_reference(model, ids, 32, 16)
    res = strided_perplexity(model, ids, max_length=32, stride=16, batch_size=batch_size)
    assert res.tokens == ref_tokens == N - 1
    assert res.windows == 9
    assert res.nll_sum == pytest.approx(ref_nll, rel=1e-5)
    assert res.perplexity == pytest.approx(math.exp(ref_nll / ref_tokens), rel=1e-5)


def test_strided_per_token_hand_check(model, ids):
    max_length, stride = 32, 16
    total, prev_end, begin = 0.0, 0, 0
    for t in range(1, N):
        # token t is scored by the first window whose targets (ids[prev_end:end]) cover it
        while not (prev_end <= t < min(begin + max_length, N)):
            prev_end = min(begin + max_length, N)
            begin += stride
        total += _token_nll(model, ids[begin : t + 1])
    res = strided_perplexity(model, ids, max_length=max_length, stride=stride, batch_size=4)
    assert res.tokens == N - 1
    assert res.nll_sum == pytest.approx(total, rel=1e-4)
    assert res.perplexity == pytest.approx(math.exp(total / (N - 1)), rel=1e-4)


def test_non_overlapping_windows_cannot_score_window_starts(model, ids):
    res = strided_perplexity(model, ids, max_length=32, stride=32)
    assert res.windows == 5 and res.tokens == N - 5
    expected = sum(
        _token_nll(model, ids[b : t + 1])
        for b in range(0, N, 32)
        for t in range(b + 1, min(b + 32, N))
    )
    assert res.nll_sum == pytest.approx(expected, rel=1e-4)


def test_bits_per_byte(model, ids):
    res = strided_perplexity(model, ids, max_length=32, stride=16, text_bytes=600)
    assert res.bytes == 600
    assert res.bits_per_byte == pytest.approx(res.nll_sum / math.log(2) / 600, rel=1e-12)
    assert strided_perplexity(model, ids, max_length=32, stride=16).bits_per_byte is None


@pytest.mark.parametrize(
    ("n", "max_length", "stride", "match"),
    [
        (N, 16, 32, "stride"),
        (N, 16, 0, "stride"),
        (1, 16, 8, "at least 2"),
        (N, 1, 1, "max_length"),
        (N, 128, 64, "128.*64"),
    ],
)
def test_invalid_args(model, ids, n, max_length, stride, match):
    with pytest.raises(ValueError, match=match):
        strided_perplexity(model, ids[:n], max_length=max_length, stride=stride)
