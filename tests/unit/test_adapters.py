import json
from pathlib import Path

import pytest

from fasttrack.core.config_loader import load_config
from fasttrack.core.errors import ModelError
from fasttrack.core.store import ArtifactRef
from fasttrack.lib import adapters
from tasks.base import resolve_base
from tasks.data import prepare_data
from tests.conftest import tiny_config_dict, write_config


@pytest.fixture
def base(tiny_cfg):
    return resolve_base(tiny_cfg, prepare_data(tiny_cfg))


def test_target_modules_naming_no_module_lists_the_linear_names(tiny_cfg, base) -> None:
    model, _, _ = adapters.load_for_training(tiny_cfg, base)
    bad = tiny_cfg.adapter.lora.model_copy(update={"target_modules": ["q_proj", "attn_qkv"]})
    with pytest.raises(ModelError, match=r"attn_qkv name no Linear module.*: .*down_proj.*q_proj"):
        adapters.lora_config(bad, model)


def test_target_modules_accept_dotted_suffixes_like_peft(tiny_cfg, base) -> None:
    model, _, _ = adapters.load_for_training(tiny_cfg, base)
    lora = tiny_cfg.adapter.lora.model_copy(
        update={"target_modules": ["self_attn.o_proj", "up_proj"]}
    )
    assert set(adapters.lora_config(lora, model).target_modules) == {"self_attn.o_proj", "up_proj"}
    wrong = lora.model_copy(update={"target_modules": ["mlp.o_proj"]})
    with pytest.raises(ModelError, match="mlp.o_proj name no Linear module"):
        adapters.lora_config(wrong, model)


def test_four_bit_unavailable_falls_back_to_lora_and_says_so(
    tiny_cfg, base, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(adapters, "four_bit_unavailable", lambda device: "no 4-bit kernel here")
    model, _, used = adapters.load_for_training(tiny_cfg, base)
    assert used == "none (no 4-bit kernel here)"
    assert not getattr(model, "is_loaded_in_4bit", False)
    assert "training plain LoRA instead: no 4-bit kernel here" in caplog.text


def test_four_bit_really_runs_on_this_cpu() -> None:
    assert adapters.four_bit_unavailable("cpu") is None


def test_model_without_template_gets_the_default_and_trains_its_end_of_turn(
    tmp_path: Path, tiny_cfg, base
) -> None:
    """No template in the model and none in the config: ChatML closed by the model's EOS, in
    the base key and manifest, and that EOS is inside the SFT labels (the model learns to stop)."""
    import datasets

    from fasttrack.core.store import ArtifactStore
    from fasttrack.core.templates import DEFAULT_TEMPLATE
    from fasttrack.lib.datasets import read_split
    from fasttrack.lib.models import load_model
    from tasks.sft import prompt_completion, sft_trainer

    model, tok = load_model(tiny_cfg, base)
    tok.chat_template = None
    model_dir = tmp_path / "no-template"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    d = tiny_config_dict(tmp_path / "s2", model={"name_or_path": str(model_dir)})
    cfg = load_config(write_config(tmp_path / "c.yaml", d))
    data = prepare_data(cfg)
    ref = resolve_base(cfg, data)
    assert ref.metrics["chat_template"].startswith("default")
    model, tok, _ = adapters.load_for_training(cfg, ref)
    assert tok.chat_template == DEFAULT_TEMPLATE
    rows = prompt_completion(read_split(ArtifactStore(cfg.store), data, "sft", "train")[:2])
    trainer = sft_trainer(cfg, model, tok, datasets.Dataset.from_list(rows), None, tmp_path / "w")
    example = trainer.train_dataset[0]
    trained = [t for t in example["labels"] if t != -100]
    assert trained[-2:] == tok("<|endoftext|>\n", add_special_tokens=False)["input_ids"][:2]
    assert tok.eos_token_id in trained


def test_dpo_refuses_an_adapter_trained_on_another_base(tiny_cfg, base) -> None:
    from tasks.dpo import _sft_policy

    other = ArtifactRef(stage="pretrain", key="f" * 64, uri="elsewhere")
    fake_sft = ArtifactRef(stage="sft", key="e" * 64, uri="nowhere")
    with pytest.raises(ModelError, match=r"trained on model None, not on pretrain ffffffffffff"):
        _sft_policy(tiny_cfg, other, fake_sft, trainable=False)


def test_preference_rows_with_empty_fields_or_equal_answers_are_dropped(tmp_path: Path) -> None:
    rows = [
        {"prompt": "What does x do?", "chosen": "It does x things well.", "rejected": "It sorts."},
        {"prompt": "What does y do?", "chosen": "", "rejected": "It does y."},
        {"prompt": "What does z do?", "chosen": "Same answer.", "rejected": "Same answer."},
        {"prompt": "   ", "chosen": "It does w things.", "rejected": "It is w."},
    ]
    path = tmp_path / "pref.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = tiny_config_dict(
        tmp_path / "s", data={"sources": [{"path": str(path), "format": "preference"}]}
    )
    ref = prepare_data(load_config(write_config(tmp_path / "c.yaml", d)))
    stats = json.loads((Path(ref.uri) / "stats.json").read_text())["preference"]
    assert stats["dropped_empty_field"] == 2 and stats["dropped_chosen_equals_rejected"] == 1
    assert stats["kept"] == 1


def test_only_the_offline_kernel_hint_of_bitsandbytes_is_dropped(caplog) -> None:
    import logging

    import fasttrack  # noqa: F401  (installs the filter)

    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s", "no net")
        log.warning("another warning")
    assert [r.getMessage() for r in caplog.records if r.name == log.name] == ["another warning"]
