from pathlib import Path

import pyarrow.parquet as pq
import pytest

import tasks.pack as pack_module
from fasttrack.core.config_loader import load_config
from fasttrack.core.errors import ModelError
from fasttrack.core.store import ArtifactStore
from fasttrack.lib.datasets import read_split
from fasttrack.lib.models import CHAT_TEMPLATE, EOS, build_tokenizer, load_model
from tasks.base import base_spec, resolve_base
from tasks.data import prepare_data
from tasks.pack import pack, pack_blocks, pack_spec
from tests.conftest import tiny_config_dict, write_config


def test_pack_blocks_eos_between_docs_and_nothing_lost() -> None:
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11]]
    blocks = list(pack_blocks(docs, block_size=4, eos_id=0, pad_id=-1))
    flat = [t for ids, mask in blocks for t, m in zip(ids, mask, strict=True) if m]
    assert flat == [1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 10, 0, 11, 0]
    assert all(len(ids) == 4 and len(mask) == 4 for ids, mask in blocks)
    assert blocks[-1] == ([0, 11, 0, -1], [1, 1, 1, 0])  # tail padded + masked, not dropped


def test_tokenizer_specials_and_chat_template() -> None:
    texts = ["def f(x):\n    return x + 1\n", "The quick brown fox. " * 20]
    tok = build_tokenizer(texts, 300, 1, CHAT_TEMPLATE)
    assert tok.eos_token == EOS and tok.pad_token_id != tok.eos_token_id
    assert tok.decode(tok("héllo wörld ✓")["input_ids"]) == "héllo wörld ✓"  # byte-level: no unk
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|user|>\nHi<|endoftext|>\n<|assistant|>\nHello<|endoftext|>\n"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")
    out = tok.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)
    masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tok.decode(masked) == "Hello<|endoftext|>"  # generation markers: EOS is trained


def test_tokenizer_or_template_change_changes_downstream_keys(tmp_path: Path) -> None:
    cfgs = []
    for i, model in enumerate(
        [{}, {"chat_template": "{{ messages }}"}, {"tokenizer": {"vocab_size": 600}}]
    ):
        d = tiny_config_dict(tmp_path / "s")
        d["model"] = {**d["model"], **model}
        cfgs.append(load_config(write_config(tmp_path / f"c{i}.yaml", d)))
    data = prepare_data(cfgs[0])
    keys = [base_spec(c, data).key for c in cfgs]
    assert len(set(keys)) == 3
    bases = [resolve_base(c, data) for c in cfgs[:2]]
    assert pack_spec(cfgs[0], data, bases[0]).key != pack_spec(cfgs[1], data, bases[1]).key


def test_scratch_base_and_pack(tiny_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ArtifactStore(tiny_cfg.store)
    data = prepare_data(tiny_cfg)
    base = resolve_base(tiny_cfg, data)
    model, tok = load_model(tiny_cfg, base)
    assert model.config.num_hidden_layers == 1 and len(tok) == base.metrics["vocab_size"]
    packed = pack(tiny_cfg, data, base)
    table = pq.read_table(Path(packed.uri) / "train.parquet").to_pylist()
    docs = [r["text"] for r in read_split(store, data, "corpus", "train")]
    expected = [
        t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ]
    got = [t for r in table for t, m in zip(r["input_ids"], r["attention_mask"], strict=True) if m]
    assert got == expected  # every token of every document, EOS after each, in order
    assert packed.metrics["train_tokens"] == len(expected)
    assert all(len(r["input_ids"]) == 64 for r in table)
    # Streamed from the memory-mapped split on 2 tokenizer processes: the same blocks.
    monkeypatch.setattr(pack_module, "pack_workers", lambda path: 2)
    out = tmp_path / "pack2"
    out.mkdir()
    pack_module.build_pack(tiny_cfg, pack_spec(tiny_cfg, data, base), out)
    assert pq.read_table(out / "train.parquet").to_pylist() == table
    assert sorted(p.name for p in out.iterdir()) == ["train.parquet", "validation.parquet"]


def _save_tiny_hf_model(path: Path, tiny_cfg, max_positions: int = 128) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    data = prepare_data(tiny_cfg)
    _, tok = load_model(tiny_cfg, resolve_base(tiny_cfg, data))
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)


def test_local_model_dir_as_base(tmp_path: Path, tiny_cfg) -> None:
    """The path real users take with a downloaded/hub model, exercised with a local dir."""
    model_dir = tmp_path / "my-model"
    _save_tiny_hf_model(model_dir, tiny_cfg)
    d = tiny_config_dict(tmp_path / "s2", model={"name_or_path": str(model_dir)})
    cfg = load_config(write_config(tmp_path / "local.yaml", d))
    data = prepare_data(cfg)
    base = resolve_base(cfg, data)
    assert (Path(base.uri) / "source.json").exists()
    assert not (Path(base.uri) / "model.safetensors").exists()  # a pointer, never a copy
    model, tok = load_model(cfg, base)
    assert model.config.hidden_size == 32
    assert pack(cfg, data, base).metrics["train_blocks"] > 0
    key = base_spec(cfg, data).key
    (model_dir / "tokenizer_config.json").write_text(
        (model_dir / "tokenizer_config.json").read_text().replace("}", ', "x_changed": 1}', 1)
    )
    assert base_spec(cfg, data).key != key  # a changed tokenizer file is a new base
    with pytest.raises(ModelError, match="model directory changed since base artifact"):
        load_model(cfg, base)


def test_block_size_beyond_local_model_positions(tmp_path: Path, tiny_cfg) -> None:
    model_dir = tmp_path / "short-model"
    _save_tiny_hf_model(model_dir, tiny_cfg, max_positions=32)
    d = tiny_config_dict(tmp_path / "s2", model={"name_or_path": str(model_dir)})
    cfg = load_config(write_config(tmp_path / "local.yaml", d))
    data = prepare_data(cfg)
    with pytest.raises(
        ModelError,
        match=r"block_size \(64\) is larger than the model's max_position_embeddings \(32\)",
    ):
        pack(cfg, data, resolve_base(cfg, data))


def test_unknown_model_dir_and_offline_hub_id(tmp_path: Path) -> None:
    d = tiny_config_dict(tmp_path / "s", model={"name_or_path": str(tmp_path / "missing")})
    cfg = load_config(write_config(tmp_path / "a.yaml", d))
    with pytest.raises(ModelError, match=r"missing: not a model directory"):
        base_spec(cfg, None)
    d = tiny_config_dict(tmp_path / "s", model={"name_or_path": "no-such-org/no-such-model"})
    cfg = load_config(write_config(tmp_path / "b.yaml", d))
    data = prepare_data(cfg)
    with pytest.raises(ModelError, match=r"cannot load 'no-such-org/no-such-model'"):
        resolve_base(cfg, data)
    assert [m["stage"] for m in ArtifactStore(cfg.store).manifests()] == ["data"]
