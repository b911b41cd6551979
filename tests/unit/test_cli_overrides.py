"""`--set` values keep their commas: YAML lists and paths survive, `a=1,b=2` still splits."""

from __future__ import annotations

from fasttrack.core.config_loader import load_config
from flows.cli_common import split_overrides


def test_commas_split_only_before_another_key() -> None:
    listed = "export.formats=[merged,gguf-f16]"
    assert split_overrides([listed]) == [listed]
    assert split_overrides(["rag.k=5,sft.max_steps=2", "dpo.beta=0.2"]) == [
        "rag.k=5",
        "sft.max_steps=2",
        "dpo.beta=0.2",
    ]
    assert split_overrides(["model.name=a,b.txt"]) == ["model.name=a,b.txt"]
    assert split_overrides(["x={a: 1, b: 2},y=3"]) == ["x={a: 1, b: 2}", "y=3"]
    assert split_overrides(None) == []


def test_a_yaml_list_override_reaches_the_config(tiny_cfg_path) -> None:
    cfg = load_config(tiny_cfg_path, split_overrides(["export.formats=[merged,gguf-f16]"]))
    assert list(cfg.export.formats) == ["merged", "gguf-f16"]
