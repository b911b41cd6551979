from pathlib import Path

import pytest

from fasttrack.core.config import DEFAULT_CONFIG, RunConfig
from fasttrack.core.config_loader import load_config
from fasttrack.core.errors import ConfigError
from tests.conftest import alias_bomb

CONFIG_DIR = Path(__file__).resolve().parents[2] / "pipeline_configs"


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.data.sources


def test_default_config_is_tiny_cpu() -> None:
    assert DEFAULT_CONFIG.name == "tiny-cpu.yaml"
    assert load_config(None).name == "tiny-cpu"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "x.yaml"
    p.write_text(text)
    return p


BASE = "data:\n  sources:\n    - {path: 'demo:pydoc_topics', format: text}\n"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    p = _write(tmp_path, BASE + "pretrain:\n  max_steps: [1, 2\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert str(exc.value).startswith(f"{p}:")
    assert "YAML syntax error" in str(exc.value)
    line = int(str(exc.value).split(":")[1])
    assert line >= 5


def test_unknown_key_names_file_line_field_and_allowed(tmp_path: Path) -> None:
    p = _write(tmp_path, BASE + "pretrain:\n  max_stepz: 5\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    msg = str(exc.value)
    assert msg.startswith(f"{p}:5: pretrain.max_stepz: unknown key (allowed: ")
    assert "max_steps" in msg


def test_out_of_range_matches_issue_format(tmp_path: Path) -> None:
    p = _write(tmp_path, BASE + "pretrain:\n  learning_rate: 0\n")
    with pytest.raises(
        ConfigError, match=r"x\.yaml:5: pretrain\.learning_rate: Input should be greater than 0"
    ):
        load_config(p)


def test_wrong_type(tmp_path: Path) -> None:
    p = _write(tmp_path, BASE + "pretrain:\n  max_steps: lots\n")
    with pytest.raises(ConfigError, match=r"pretrain\.max_steps: Input should be a valid integer"):
        load_config(p)


def test_nested_list_field_path(tmp_path: Path) -> None:
    p = _write(tmp_path, "data:\n  sources:\n    - {path: a.jsonl, format: csvish}\n")
    with pytest.raises(ConfigError, match=r"x\.yaml:3: data\.sources\.0\.format: Input should be"):
        load_config(p)


def test_unknown_column_field_is_rejected(tmp_path: Path) -> None:
    p = _write(
        tmp_path, "data:\n  sources:\n    - {path: a.jsonl, format: alpaca, columns: {answer: a}}\n"
    )
    with pytest.raises(ConfigError, match=r"columns\.answer: not a field of format alpaca"):
        load_config(p)


def test_block_size_larger_than_positions(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        BASE
        + "model:\n  architecture: {max_position_embeddings: 64}\npretrain: {block_size: 128}\n",
    )
    with pytest.raises(
        ConfigError, match=r"block_size \(128\) is larger than .*max_position_embeddings \(64\)"
    ):
        load_config(p)


def test_overrides_apply_and_parse_yaml_values(tmp_path: Path) -> None:
    p = _write(tmp_path, BASE)
    cfg = load_config(p, ["pretrain.max_steps=50", "pretrain.learning_rate=1e-3", "name=abc"])
    assert cfg.pretrain.max_steps == 50
    assert cfg.pretrain.learning_rate == pytest.approx(1e-3)
    assert cfg.name == "abc"
    cfg = load_config(p, ["data.sources.0.max_rows=3"])
    assert cfg.data.sources[0].max_rows == 3


def test_bad_override_names_the_set_argument(tmp_path: Path) -> None:
    p = _write(tmp_path, BASE)
    with pytest.raises(
        ConfigError,
        match=r"--set pretrain\.max_steps=-1: pretrain\.max_steps: Input should be greater than 0",
    ):
        load_config(p, ["pretrain.max_steps=-1"])
    with pytest.raises(ConfigError, match=r"--set pretrain\.bogus=1: pretrain\.bogus: unknown key"):
        load_config(p, ["pretrain.bogus=1"])
    with pytest.raises(ConfigError, match=r"--set pretrain: expected KEY=VALUE"):
        load_config(p, ["pretrain"])


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, BASE))
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error type is internal
        cfg.pretrain.max_steps = 3  # type: ignore[misc]


def test_adapter_section_and_deprecated_sft_fields_give_one_key(tmp_path) -> None:
    """`sft.lora`/`sft.quantization` (old place) load into `adapter`, warn, and key the same."""
    import yaml

    from fasttrack.core.store import ArtifactRef
    from tasks.sft import sft_spec

    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    quant = {"load_in_4bit": False}
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw.pop("adapter")
    new_path, old_path = tmp_path / "new.yaml", tmp_path / "old.yaml"
    new_path.write_text(yaml.safe_dump(raw | {"adapter": {"lora": lora, "quantization": quant}}))
    old_path.write_text(
        yaml.safe_dump(raw | {"sft": {**raw["sft"], "lora": lora, "quantization": quant}})
    )
    new = load_config(new_path)
    with pytest.warns(FutureWarning, match="sft.lora is deprecated: move it to adapter.lora"):
        old = load_config(old_path)
    assert old.adapter == new.adapter and old.adapter.lora.r == 4
    assert old.sft.lora is None and not old.adapter.quantization.load_in_4bit
    ref = ArtifactRef(stage="base", key="0" * 64, uri="/nowhere")
    assert sft_spec(old, ref, ref).key == sft_spec(new, ref, ref).key
    assert sft_spec(load_config(None), ref, ref).key != sft_spec(new, ref, ref).key
    with pytest.raises(ConfigError, match="adapter.lora or sft.lora"):
        load_config(new_path, ["sft.lora.r=4"])


def test_alias_bomb_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    import tracemalloc

    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(6))  # 9**6 = 531k values once expanded (1e9 at 10 levels)
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as exc:
            load_config(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(exc.value) == (
        f"{path}: the YAML expands to more than 100000 values (nested aliases?); refused"
    )
    assert peak < 200 * 2**20  # the walk stopped at its budget, long before the expansion
