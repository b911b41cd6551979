"""Export stage without Prefect: a local bf16 base model exported as `merged` keeps bf16, is
cached by key, and a Qwen2 base goes through the GGUF path too (not only the scratch Llama)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from fasttrack.core.config_loader import load_config
from tasks.base import resolve_base
from tasks.data import prepare_data
from tasks.export import base_dtype, export_model
from tests.conftest import tiny_config_dict, write_config


@pytest.fixture(scope="module")
def qwen_bf16_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A tiny Qwen2 model saved in bfloat16 with the tiny model's tokenizer."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("qwen") / "qwen-bf16"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)  # fmt: skip
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_merged_keeps_the_base_dtype_and_is_cached(tmp_path: Path, qwen_bf16_dir: Path) -> None:
    from safetensors import safe_open

    data = {"sources": [{"path": "demo:pydoc_topics", "format": "text", "max_rows": 30}]}
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_config_dict(
        tmp_path / "store", model={"name_or_path": str(qwen_bf16_dir)}, data=data,
        export={"speed_tokens": 4},
    )))  # fmt: skip
    data_ref = prepare_data(cfg)
    base = resolve_base(cfg, data_ref)
    assert base_dtype(cfg, base) == torch.bfloat16
    merged = export_model(cfg, base, data_ref, "merged")
    with safe_open(str(Path(merged.uri) / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118
    assert merged.metrics["dtype"] == "bfloat16" and merged.metrics["perplexity_delta"] == 0
    q8 = export_model(cfg, base, data_ref, "gguf-q8_0")
    assert q8.metrics["logit_max_rel_err"] < q8.metrics["logit_tolerance"]
    again = export_model(cfg, base, data_ref, "merged")
    assert again.reused and again.key == merged.key
    shutil.rmtree(merged.uri)  # the store is the truth: a missing artifact is rebuilt
    assert not export_model(cfg, base, data_ref, "merged").reused
