"""Preflight's torch-free reading of a model dir gives the verdicts of the meta-device model
and of the loaded tokenizer, on every family of the family matrix (tiny random checkpoints)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fasttrack.lib.model_files import (
    SCRATCH_LINEARS,
    adaptable_modules,
    tensor_shapes,
    tokenizer_size,
)
from tests.e2e.families import FAMILIES, build_family, corpus

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    texts = corpus()[:20]
    root = tmp_path_factory.mktemp("families")
    return {f.name: build_family(f, root / f.name, texts) for f in FAMILIES}


def _meta_linears(path: Path) -> set[str]:
    from transformers import AutoConfig

    from fasttrack.lib.planner import model_shape

    return set(model_shape(AutoConfig.from_pretrained(path)).linears)


@pytest.mark.parametrize("family", [f.name for f in FAMILIES])
def test_header_modules_and_tokenizer_size_match_transformers(
    family_dirs: dict[str, Path], family: str
) -> None:
    from transformers import AutoTokenizer

    path = family_dirs[family]
    assert set(adaptable_modules(path)) == _meta_linears(path)
    assert tokenizer_size(path) == len(AutoTokenizer.from_pretrained(path))


def test_sharded_checkpoint_is_read_from_every_shard(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    whole = next(f for f in FAMILIES if f.name == "phi3")
    path = build_family(whole, tmp_path / "one", corpus()[:5])
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(path).save_pretrained(sharded, max_shard_size="100KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    assert tensor_shapes(sharded) == tensor_shapes(path)
    assert adaptable_modules(sharded) == adaptable_modules(path)


def test_scratch_linears_are_the_scratch_models() -> None:
    from transformers import LlamaConfig

    from fasttrack.lib.planner import model_shape

    names = {n.rsplit(".", 1)[-1] for n in model_shape(LlamaConfig(num_hidden_layers=1)).linears}
    assert names == set(SCRATCH_LINEARS)


def test_preflight_of_a_local_model_imports_no_torch(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The whole model check (dir rules, vocab, lengths, LoRA targets) without torch: what
    keeps a bad input's answer within seconds (benchmarks/results/preflight.json)."""
    from tests.conftest import tiny_config_dict, write_config

    cfg = tiny_config_dict(tmp_path / "store", model={"name_or_path": str(tiny_model_dir)})
    cfg["adapter"] = {"lora": {"target_modules": ["q_proj", "v_proj"]}}
    path = write_config(tmp_path / "run.yaml", cfg)
    code = (
        "import sys\n"
        "from fasttrack.core.config import STAGES\n"
        "from fasttrack.core.config_loader import load_config\n"
        "from fasttrack.lib.preflight import preflight\n"
        f"preflight(load_config({str(path)!r}), STAGES)\n"
        "print(sorted(m for m in ('torch', 'peft', 'trl', 'prefect') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
