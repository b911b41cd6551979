"""GGUF writer: tiny Llama / Mistral / Qwen2 models written as f16 and q8_0, read back by
`gguf.GGUFReader` and by transformers' GGUF loader (a reader we did not write), whose logits
must match the original model and whose tokenizer must round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fasttrack.core.errors import ModelError
from fasttrack.lib.gguf_export import permute_rotary, read_metadata, write_gguf
from fasttrack.lib.models import CHAT_TEMPLATE, build_tokenizer
from tasks.export import GGUF_TOLERANCE

TEXT = "Assignment statements bind names to objects; for loops iterate over sequences."
TOLERANCE = {"f16": GGUF_TOLERANCE["gguf-f16"], "q8_0": GGUF_TOLERANCE["gguf-q8_0"]}


@pytest.fixture(scope="module")
def tok():
    import pydoc_data.topics as topics

    return build_tokenizer(list(topics.topics.values()), 400, 2, CHAT_TEMPLATE)


def _model(family: str, tok, tied: bool):
    import transformers

    cls, model_cls = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    }[family]
    config = getattr(transformers, cls)(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=tied, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # the default init is too flat to tell a misplaced tensor from noise
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    return model


@pytest.mark.parametrize(
    ("family", "tied"), [("llama", True), ("mistral", False), ("qwen2", False), ("qwen2", True)]
)
@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_gguf_loads_in_transformers_with_matching_logits(
    tmp_path: Path, tok, family: str, tied: bool, kind: str
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = _model(family, tok, tied)
    path = write_gguf(model, tok, tmp_path / f"model-{kind}.gguf", kind)

    meta = read_metadata(path)
    arch = "qwen2" if family == "qwen2" else "llama"
    assert meta["general.architecture"] == arch
    assert meta[f"{arch}.block_count"] == 2 and meta[f"{arch}.attention.head_count_kv"] == 2
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.tokens"] == len(tok)
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert meta["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert ("output.weight" in meta["tensors"]) is not tied
    weight_type = {"f16": "F16", "q8_0": "Q8_0"}[kind]
    assert meta["tensors"]["blk.0.attn_q.weight"] == weight_type
    assert meta["tensors"]["blk.0.attn_norm.weight"] == "F32"

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    assert loaded.config.model_type == ("qwen2" if family == "qwen2" else "llama")
    gtok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    assert gtok(TEXT)["input_ids"] == ids[0].tolist()  # same ids from the GGUF vocabulary
    assert gtok.decode(ids[0]) == TEXT
    chat = [{"role": "user", "content": "hi"}]
    assert gtok.apply_chat_template(chat, tokenize=False) == tok.apply_chat_template(
        chat, tokenize=False
    )
    with torch.no_grad():
        want, got = model(ids).logits, loaded(ids).logits
        exact = _rounded(model, kind)(ids).logits
    err = (want - got).abs().max() / want.abs().max()
    assert err < TOLERANCE[kind], f"{family} {kind}: relative logit error {err:.2e}"
    # Every tensor is where llama.cpp expects it (names, q/k permutation, block layout): the
    # file equals the model with its 2-D weights rounded to f16 / q8_0, to float precision.
    assert (exact - got).abs().max() / exact.abs().max() < 1e-5


def _rounded(model, kind: str):
    """A copy of `model` whose 2-D weights went through f16 or q8_0 and back (gguf.quants)."""
    import copy

    import gguf

    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            if p.dim() != 2:
                continue
            w = p.numpy()
            if kind == "q8_0":
                q8 = gguf.GGMLQuantizationType.Q8_0
                w = gguf.quants.dequantize(gguf.quants.quantize(w, q8), q8)
            else:
                w = w.astype("float16")
            p.copy_(torch.from_numpy(w.astype("float32")))
    return out


def test_permutation_is_a_per_head_interleave() -> None:
    w = torch.arange(8.0).reshape(8, 1).numpy()  # 2 heads of dim 4: halves (0,1|2,3)
    assert permute_rotary(w, 2, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_unsupported_family_is_a_clear_error(tmp_path: Path, tok) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ModelError, match="GGUF export supports model types llama, mistral, qwen2"):
        write_gguf(model, tok, tmp_path / "x.gguf", "f16")
