"""Preflight: input mistakes found before any stage runs, on real tiny models (no mocks)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fasttrack.core.config import STAGES
from fasttrack.core.config_loader import load_config
from fasttrack.core.errors import ConfigError, DataError, ModelError
from fasttrack.lib.preflight import lengths, preflight
from tests.conftest import tiny_config_dict, write_config


def _cfg(tmp: Path, **sections):
    return load_config(write_config(tmp / "run.yaml", tiny_config_dict(tmp / "store", **sections)))


def _model_cfg(tmp: Path, path: Path, **sections):
    return _cfg(tmp, model={"name_or_path": str(path), **sections.pop("model", {})}, **sections)


@pytest.fixture(scope="module")
def small_embeddings(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with 8 embedding rows fewer than its tokenizer has tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("small-emb") / "model"
    shutil.copytree(tiny_model_dir, path)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.resize_token_embeddings(len(AutoTokenizer.from_pretrained(path)) - 8)
    model.save_pretrained(path)
    return path


def test_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "notes.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    sources = [
        {"path": "notes.jsonl", "format": "text"},
        {"path": "demo:stdlib_qa", "format": "alpaca"},
    ]
    cfg = load_config(
        write_config(
            folder / "run.yaml", tiny_config_dict(tmp_path / "s", data={"sources": sources})
        )
    )
    assert cfg.data.sources[0].path == str(folder / "notes.jsonl")
    assert cfg.data.sources[1].path == "demo:stdlib_qa"
    preflight(cfg, ["data"])  # found from another working directory


def test_relative_template_file_resolves_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative `.jinja` path means the file beside the config, from any working directory,
    and a missing one names the folder it was looked for in."""
    from fasttrack.core.templates import resolve

    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "mine.jinja").write_text("{{ messages[0]['content'] }}")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg_dict = tiny_config_dict(tmp_path / "s", model={"chat_template": "mine.jinja"})
    cfg = load_config(write_config(folder / "run.yaml", cfg_dict))
    assert cfg.model.chat_template == str(folder / "mine.jinja")
    assert resolve(cfg.model.chat_template) == "{{ messages[0]['content'] }}"
    cfg_dict["model"]["chat_template"] = "gone.jinja"
    with pytest.raises(ConfigError, match=rf"gone.jinja \(relative to {folder}\): No such"):
        load_config(write_config(folder / "run.yaml", cfg_dict))


def test_missing_source_names_config_line_and_field(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, data={"sources": [{"path": "gone.jsonl", "format": "text"}]})
    with pytest.raises(DataError) as info:
        preflight(cfg, ["data"])
    line = next(
        i for i, text in enumerate((tmp_path / "run.yaml").read_text().splitlines(), 1)
        if "gone.jsonl" in text
    )  # fmt: skip
    assert str(info.value).startswith(f"{tmp_path / 'run.yaml'}:{line}: data.sources.0.path: ")
    assert str(tmp_path / "gone.jsonl") in str(info.value)


def test_vocab_larger_than_embeddings_is_refused(tmp_path: Path, small_embeddings: Path) -> None:
    cfg = _model_cfg(tmp_path, small_embeddings)
    with pytest.raises(ModelError, match=r"the tokenizer has \d+ tokens but the embedding"):
        preflight(cfg, ["pretrain"])


def test_resize_embeddings_grows_the_base_and_is_in_the_key(
    tmp_path: Path, small_embeddings: Path
) -> None:
    import torch
    from transformers import AutoTokenizer

    from fasttrack.lib.models import load_model
    from tasks.base import base_spec, resolve_base

    cfg = _model_cfg(tmp_path, small_embeddings, model={"resize_embeddings": True})
    preflight(cfg, STAGES)
    assert base_spec(cfg).key != base_spec(_model_cfg(tmp_path, small_embeddings)).key
    model, tok = load_model(cfg, resolve_base(cfg))
    n = len(AutoTokenizer.from_pretrained(small_embeddings))
    assert model.get_input_embeddings().num_embeddings == n == len(tok)
    logits = model(torch.tensor([[n - 1, 3, n - 2]])).logits  # the highest ids now embed
    assert logits.shape[-1] == n and torch.isfinite(logits).all()


@pytest.mark.parametrize("field", [f for f, _ in lengths(load_config(None), set(STAGES))])
def test_every_length_is_checked_against_positions(
    tmp_path: Path, tiny_model_dir: Path, field: str
) -> None:
    section, *rest = field.split(".")
    value: dict = {rest[-1]: 129 if field.startswith("generation") else 256}
    for part in reversed(rest[:-1]):
        value = {part: value}
    if field == "evaluate.perplexity.max_length":
        value["perplexity"]["stride"] = 32
    cfg = _model_cfg(tmp_path, tiny_model_dir, **{section: value})
    with pytest.raises(ConfigError, match=rf": {field} \(\d+\) .* max_position_embeddings \(128\)"):
        preflight(cfg, STAGES)


def test_lora_targets_must_exist(tmp_path: Path, tiny_model_dir: Path) -> None:
    ok = _model_cfg(tmp_path, tiny_model_dir, sft={"lora": {"target_modules": ["q_proj"]}})
    preflight(ok, ["sft"])
    bad = _model_cfg(tmp_path, tiny_model_dir, sft={"lora": {"target_modules": ["c_attn"]}})
    with pytest.raises(ModelError, match="sft.lora.target_modules: c_attn name no Linear"):
        preflight(bad, ["sft"])


def test_model_without_chat_template_passes_preflight_with_the_default(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """No template in the model or the config is not an error: the base stage applies the
    documented ChatML-on-EOS default (fasttrack/core/templates.py), so SFT/DPO can run."""
    path = tmp_path / "model"
    shutil.copytree(tiny_model_dir, path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    cfg = _model_cfg(tmp_path, path)
    preflight(cfg, ["data", "pretrain", "evaluate"])
    preflight(cfg, ["sft"])
    with pytest.raises(ConfigError, match="chat_template"):
        _model_cfg(tmp_path, path, model={"chat_template": "no-such-template"})


def test_missing_model_dir_is_not_called_a_hub_id(tmp_path: Path) -> None:
    for name in ("./no-such-model", "models/v2/no-such-model"):
        cfg = _cfg(tmp_path, model={"name_or_path": name})
        with pytest.raises(ModelError, match="no-such-model: no such model directory"):
            preflight(cfg, ["pretrain"])


def test_rag_prompt_past_positions_is_flagged_before_any_stage(
    tmp_path: Path, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """top_k chunks + question + template + max_new_tokens past the model's 128 positions:
    left truncation would drop the best-ranked chunks, so preflight says so, naming the fields."""
    rag = {"top_k": 3, "chunk": {"size_tokens": 64, "overlap_tokens": 8}}
    big = _model_cfg(tmp_path, tiny_model_dir, rag=rag)
    with caplog.at_level("WARNING", logger="fasttrack.preflight"):
        preflight(big, ["data", "rag", "evaluate"])
    line = next(r.getMessage() for r in caplog.records if "RAG prompt" in r.getMessage())
    assert ": rag.top_k: a RAG prompt needs about" in line
    assert "rag.top_k 3 x rag.chunk.size_tokens 64" in line and "has 128 positions" in line
    caplog.clear()
    fits = {"top_k": 1, "chunk": {"size_tokens": 32, "overlap_tokens": 8}}
    small = _model_cfg(tmp_path, tiny_model_dir, rag=fits, generation={"max_new_tokens": 16})
    with caplog.at_level("WARNING", logger="fasttrack.preflight"):
        preflight(small, ["data", "rag", "evaluate"])
    assert not [r for r in caplog.records if "RAG prompt" in r.getMessage()]
