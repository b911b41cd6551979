import math

import pytest
import torch
import transformers

from fasttrack.lib.perplexity import PerplexityResult, strided_perplexity

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


def _tiny(cls_name: str, **overrides) -> torch.nn.Module:
    """A tiny random causal LM of the given transformers class (config class by naming rule)."""
    config_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    shape = {
        "vocab_size": 97,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }
    torch.manual_seed(2)
    return getattr(transformers, cls_name)(config_cls(**{**shape, **overrides})).eval()


def _assert_matches_hf_docs_loop(model, ids, max_length, stride, batch_size):
    ref_nll, ref_tokens = _hf_docs_reference(model, ids, max_length, stride)
    res = strided_perplexity(
        model, ids, max_length=max_length, stride=stride, batch_size=batch_size
    )
    assert res.tokens == ref_tokens
    assert res.nll_sum == pytest.approx(ref_nll, rel=1e-5)
    assert res.perplexity == pytest.approx(math.exp(ref_nll / ref_tokens), rel=1e-5)


@pytest.mark.parametrize(
    ("n", "max_length", "stride", "batch_size"),
    [
        (N, 32, 16, 2),  # first window, 7 middle windows (3 full batches + 1), short last
        (N, 48, 20, 5),  # last window of 10 tokens, 3 targets
        (N, 32, 7, 4),  # heavy overlap, many windows per batch
        (140, 40, 25, 3),  # last window full length: one shape for all but the first
        (40, 64, 16, 8),  # one window only: stream shorter than max_length
    ],
)
def test_batched_windows_match_one_window_loop(model, ids, n, max_length, stride, batch_size):
    _assert_matches_hf_docs_loop(model, ids[:n], max_length, stride, batch_size)


@pytest.mark.parametrize(
    ("cls_name", "overrides"),
    [
        ("LlamaForCausalLM", {"tie_word_embeddings": True}),
        # softcapping after lm_head (cap below the random-init logit scale, so it bites) and
        # sliding-window attention shorter than the window
        (
            "Gemma2ForCausalLM",
            {"final_logit_softcapping": 0.05, "sliding_window": 16, "head_dim": 8},
        ),
    ],
)
def test_model_types_match_one_window_loop(ids, cls_name, overrides):
    _assert_matches_hf_docs_loop(_tiny(cls_name, **overrides), ids, 32, 12, 3)


def test_unmerged_lora_matches_one_window_loop(ids):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(_tiny("LlamaForCausalLM"), lora).eval()
    _assert_matches_hf_docs_loop(model, ids, 32, 16, 4)


def test_lm_head_sees_only_scored_positions(model, ids):
    widths: list[int] = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: widths.append(args[0].size(1)))
    try:
        strided_perplexity(model, ids, max_length=32, stride=16, batch_size=4)
    finally:
        hook.remove()
    # first window scores 31 tokens, middles 16, the last (128..150) 150 - 144 = 6; +1 each
    assert sorted(set(widths)) == [7, 17, 32]


class _NoKeep(torch.nn.Module):
    """A causal LM whose forward takes neither logits_to_keep nor use_cache."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.widths: list[int] = []

    def forward(self, input_ids):
        out = self.inner(input_ids=input_ids)
        self.widths.append(out.logits.size(1))
        return out


class _IgnoresKeep(_NoKeep):
    """Takes logits_to_keep but returns logits for every position anyway."""

    def forward(self, input_ids, logits_to_keep=0, use_cache=None):
        return super().forward(input_ids)


@pytest.mark.parametrize("wrapper", [_NoKeep, _IgnoresKeep])
def test_full_logits_fallback(model, ids, wrapper):
    wrapped = wrapper(model)
    ref_nll, _ = _hf_docs_reference(model, ids, 32, 16)
    res = strided_perplexity(wrapped, ids, max_length=32, stride=16, batch_size=3)
    assert max(wrapped.widths) == 32  # full logits really came back
    assert res.tokens == N - 1
    assert res.nll_sum == pytest.approx(ref_nll, rel=1e-5)


@pytest.mark.parametrize("stride", [16, 32])
def test_per_document_nll_adds_up_to_the_stream_and_matches_each_token(model, ids, stride):
    """The per-document rows a perplexity bootstrap resamples: each position's NLL is the one
    the strided protocol scored (hand check), and documents add up to the stream's total."""
    from fasttrack.lib.perplexity import per_document

    res = strided_perplexity(model, ids, max_length=32, stride=stride, per_token=True)
    lengths = [40, 7, 63, 40]  # documents of the 150-token stream
    docs = per_document(res.token_nll, lengths, [100, 20, 150, 90])
    assert sum(d[0] for d in docs) == pytest.approx(res.nll_sum, rel=1e-9)
    assert sum(d[1] for d in docs) == res.tokens and [d[2] for d in docs] == [100, 20, 150, 90]
    assert math.isnan(res.token_nll[0])  # the first token has no context
    t = 50  # scored by the first window reaching it, with that window's context
    begin = min(b for b in range(0, N, stride) if min(b + 32, N) > t)
    assert res.token_nll[t] == pytest.approx(_token_nll(model, ids[begin : t + 1]), rel=1e-4)
