"""Preflight planner: exact counts against hand arithmetic and peft, memory formulas, verdicts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from fasttrack.core.config import RunConfig
from fasttrack.core.config_loader import load_config
from fasttrack.core.errors import ModelError
from fasttrack.lib.planner import GiB, StagePlan, model_config, parse_size, plan, render_plan
from tests.conftest import tiny_config_dict, write_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Llama-2-7B: vocab 32000, hidden 4096, intermediate 11008, 32 layers, untied lm_head.
V, H, FFN, L = 32000, 4096, 11008, 32
ATTN = 4 * H * H  # q, k, v, o (32 kv heads: k and v are H x H)
MLP = 3 * H * FFN  # gate, up, down
LAYER = ATTN + MLP + 2 * H  # + input and post-attention RMSNorm weights
N_7B = V * H + L * LAYER + H + V * H  # embed_tokens + layers + final norm + lm_head
QUANTIZED = L * (ATTN + MLP)  # every Linear but lm_head is 4-bit under QLoRA
LORA_QV = L * 2 * 8 * (H + H)  # r=8 on q_proj and v_proj: r * (in + out) each


@pytest.fixture(scope="module")
def llama7b_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("llama-2-7b-shape")
    LlamaConfig(
        vocab_size=V, hidden_size=H, intermediate_size=FFN, num_hidden_layers=L,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        tie_word_embeddings=False,
    ).save_pretrained(path)  # fmt: skip
    return path


def make_cfg(tmp_path: Path, model: Path | None = None, **sections: Any) -> RunConfig:
    if model is not None:
        sections["model"] = {"name_or_path": str(model)}
    cfg = tiny_config_dict(tmp_path / "store", **sections)
    return load_config(write_config(tmp_path / "run.yaml", cfg))


def by_stage(plans: list[StagePlan]) -> dict[str, StagePlan]:
    return {p.stage: p for p in plans}


def test_llama7b_parameter_count_is_exact(tmp_path: Path, llama7b_dir: Path) -> None:
    assert N_7B == 6_738_415_616
    plans = by_stage(plan(make_cfg(tmp_path, llama7b_dir)))
    assert plans["pretrain"].total_params == N_7B
    assert plans["pretrain"].trainable_params == N_7B


def test_lora_q_v_matches_peft_figure(tmp_path: Path, llama7b_dir: Path) -> None:
    lora = {"r": 8, "target_modules": ["q_proj", "v_proj"]}
    plans = by_stage(plan(make_cfg(tmp_path, llama7b_dir, sft={"lora": lora})))
    assert LORA_QV == 4_194_304  # "trainable params: 4,194,304 || all params: 6,742,609,920"
    for stage in ("sft", "dpo"):
        assert plans[stage].trainable_params == LORA_QV
        assert plans[stage].total_params == N_7B + LORA_QV == 6_742_609_920


@pytest.mark.parametrize(
    ("precision", "optimizer", "per_param"),
    [("auto", "adamw_torch", 16), ("bf16", "adamw_torch", 16), ("fp32", "adamw_torch", 16),
     ("bf16", "adamw_8bit", 10), ("fp32", "paged_adamw_8bit", 10)],
)  # fmt: skip
def test_full_finetune_state_bytes_per_param(
    tmp_path: Path, llama7b_dir: Path, precision: str, optimizer: str, per_param: int
) -> None:
    pretrain = {"precision": precision, "optimizer": optimizer}
    p = by_stage(plan(make_cfg(tmp_path, llama7b_dir, pretrain=pretrain)))["pretrain"]
    assert p.method == "full"
    assert p.weights_bytes + p.grads_bytes + p.optimizer_bytes == per_param * N_7B
    assert p.weights_bytes == (4 if precision == "fp32" else 2) * N_7B


def test_qlora_weight_bytes_by_hand(tmp_path: Path, llama7b_dir: Path) -> None:
    sft = {"lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}}
    p = by_stage(plan(make_cfg(tmp_path, llama7b_dir, sft=sft)))["sft"]
    assert p.method == "qlora"
    # nf4: 0.5 byte/param; double quant: 8-bit absmax per 64 params + fp32 constant per 64*256.
    quantized = QUANTIZED // 2 + QUANTIZED // 64 + 4 * QUANTIZED // (64 * 256)
    sixteen_bit = 2 * (N_7B - QUANTIZED)  # embeddings, norms, lm_head
    adapter = 2 * LORA_QV
    assert p.weights_bytes == quantized + sixteen_bit + adapter == 3_873_980_416
    assert adapter + p.grads_bytes + p.optimizer_bytes == 16 * LORA_QV  # 2 + 2 + 4 + 8

    single = {**sft, "quantization": {"double_quant": False}}
    p = by_stage(plan(make_cfg(tmp_path, llama7b_dir, sft=single)))["sft"]
    assert p.weights_bytes == QUANTIZED // 2 + 4 * QUANTIZED // 64 + sixteen_bit + adapter


def test_flops_and_tokens(tmp_path: Path, llama7b_dir: Path) -> None:
    t = {"max_steps": 10, "per_device_batch_size": 2, "gradient_accumulation_steps": 3}
    lora = {"r": 8, "target_modules": ["q_proj", "v_proj"]}
    cfg = make_cfg(
        tmp_path, llama7b_dir, pretrain={**t, "block_size": 256},
        sft={**t, "max_length": 128, "lora": lora}, dpo={**t, "max_length": 128},
    )  # fmt: skip
    plans = by_stage(plan(cfg))
    d = 10 * 2 * 3 * 256
    assert plans["pretrain"].tokens == d
    assert plans["pretrain"].flops == 6 * N_7B * d
    assert plans["pretrain"].tokens_per_param == pytest.approx(d / N_7B)
    assert plans["pretrain"].chinchilla_ratio == pytest.approx(d / N_7B / 20)
    d_sft = 10 * 2 * 3 * 128
    n = N_7B + LORA_QV
    assert plans["sft"].tokens == d_sft
    assert plans["sft"].flops == (2 * n + 2 * n + 2 * LORA_QV) * d_sft  # fwd, act- and w-grads
    assert plans["dpo"].tokens == 2 * d_sft  # chosen + rejected
    assert plans["dpo"].micro_batch == 4

    checkpointed = {**t, "block_size": 256, "gradient_checkpointing": True}
    cfg = make_cfg(tmp_path, llama7b_dir, pretrain=checkpointed)
    assert by_stage(plan(cfg))["pretrain"].flops == 8 * N_7B * d  # + one recomputed forward


def test_full_7b_does_not_fit_24gib_and_suggests_qlora(tmp_path: Path, llama7b_dir: Path) -> None:
    p = by_stage(plan(make_cfg(tmp_path, llama7b_dir), parse_size("24GiB")))["pretrain"]
    assert p.fits is False
    assert p.total_bytes > 16 * N_7B
    assert "does not fit" in p.verdict and "QLoRA" in p.verdict
    assert "gradient_checkpointing" in p.verdict


def test_qlora_7b_fits_24gib(tmp_path: Path, llama7b_dir: Path) -> None:
    knobs = {"per_device_batch_size": 1, "gradient_checkpointing": True, "max_length": 512}
    cfg = make_cfg(tmp_path, llama7b_dir, sft=knobs, dpo=knobs)
    plans = by_stage(plan(cfg, 24 * GiB))
    for stage in ("sft", "dpo"):
        assert plans[stage].method == "qlora"
        assert plans[stage].fits is True, plans[stage].verdict
        assert plans[stage].verdict.startswith("fits")
    assert plans["dpo"].activation_bytes > plans["sft"].activation_bytes  # 2 sequences per pair
    assert plan(cfg, None)[1].fits is None


def test_lora_without_checkpointing_gets_the_cheapest_knob(tmp_path: Path, llama7b_dir: Path):
    sft = {"quantization": {"load_in_4bit": False}, "max_length": 512, "per_device_batch_size": 8}
    p = by_stage(plan(make_cfg(tmp_path, llama7b_dir, sft=sft), 40 * GiB))["sft"]
    assert p.method == "lora" and p.fits is False
    assert "per_device_batch_size=1" in p.verdict and "gradient_accumulation_steps=8" in p.verdict


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")
def test_scratch_plans_offline_and_matches_peft(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers
    from peft import LoraConfig, get_peft_model

    def no_hub(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("scratch must not load any config")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_hub)
    for lora in ({}, {"use_dora": True, "r": 4}, {"modules_to_save": ["lm_head"]}):
        cfg = make_cfg(tmp_path, sft={"lora": lora}, dpo={"enabled": False})
        plans = by_stage(plan(cfg, 24 * GiB))
        assert set(plans) == {"pretrain", "sft"}
        assert plans["sft"].fits is True
        model = transformers.AutoModelForCausalLM.from_config(model_config(cfg))
        assert plans["pretrain"].total_params == sum(p.numel() for p in model.parameters())
        ours = cfg.adapter.lora
        peft_model = get_peft_model(
            model,
            LoraConfig(
                r=ours.r, target_modules=ours.target_modules, use_dora=ours.use_dora,
                modules_to_save=ours.modules_to_save or None, task_type="CAUSAL_LM",
            ),
        )  # fmt: skip
        trainable, total = peft_model.get_nb_trainable_parameters()
        assert (plans["sft"].trainable_params, plans["sft"].total_params) == (trainable, total)


def test_scratch_vocab_from_tokenizer_config(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    config = model_config(cfg)
    assert config.vocab_size == cfg.model.tokenizer.vocab_size
    assert config.hidden_size == cfg.model.architecture.hidden_size


def test_unknown_target_module_lists_linear_names(tmp_path: Path, llama7b_dir: Path) -> None:
    cfg = make_cfg(tmp_path, llama7b_dir, sft={"lora": {"target_modules": ["c_attn"]}})
    with pytest.raises(ModelError, match="c_attn") as err:
        plan(cfg)
    message = str(err.value)
    assert "\n" not in message
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in message


def test_missing_model_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot load .*no-such-model"):
        plan(make_cfg(tmp_path, tmp_path / "no-such-model"))


def test_render_plan(tmp_path: Path, llama7b_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    plans = plan(make_cfg(tmp_path, llama7b_dir), 24 * GiB)
    table = render_plan(plans, 24 * GiB)
    assert isinstance(table, Table) and table.row_count == len(plans)
    console = Console(record=True, width=300)
    console.print(table)
    text = console.export_text()
    assert "GiB" in text and "does not fit" in text and "fits (" in text
    assert f"{plans[0].flops:.1e}".replace("e+", "e") in text  # e.g. 8.3e14


@pytest.mark.parametrize(
    ("text", "expected"),
    [("24GiB", 24 * 2**30), ("24GB", 24 * 10**9), ("80G", 80 * 2**30), ("512MiB", 512 * 2**20),
     ("512mb", 512 * 10**6), ("1.5TiB", 3 * 2**39), (" 16 gib ", 16 * 2**30), ("4096", 4096),
     ("100B", 100), ("2Ti", 2 * 2**40)],
)  # fmt: skip
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "24XB", "-1GiB", "24 GiB extra", "0GB", "1iB"])
def test_parse_size_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="not a memory size"):
        parse_size(text)
