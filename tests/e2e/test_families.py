"""Every causal-LM family we claim to support, through the whole pipeline and `fasttrack ask`.

Tiny random checkpoints (tests/e2e/families.py) with their own tokenizers and conventions run
data -> base -> pack -> pretrain -> SFT (QLoRA) -> dpo_ref -> DPO -> rag -> evaluate -> report,
in one shared store (data and RAG index are built once), then answer through the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from fasttrack.core.config_loader import load_config
from fasttrack.core.store import ArtifactStore
from flows.cli import app
from flows.pipeline import STEPS, PipelineParams, pipeline
from tests.conftest import tiny_config_dict, write_config
from tests.e2e.families import FAMILIES, build_family, corpus

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_harness")]

_STEPS = {
    "max_steps": 3, "per_device_batch_size": 4, "warmup_ratio": 0.0, "lr_scheduler": "constant",
    "eval_steps": 3, "save_steps": 3, "logging_steps": 1,
}  # fmt: skip


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("families")
    return {"tmp": tmp, "store": tmp / "store", "texts": corpus()}


def family_config(shared: dict[str, Any], family, model_dir: Path) -> Path:
    d = tiny_config_dict(
        shared["store"],
        name=f"family-{family.name}",
        model={"name_or_path": str(model_dir), **family.run},
        pretrain={**_STEPS, "block_size": 64, "learning_rate": 1e-2, "eval_max_blocks": 4},
        sft={
            **_STEPS,
            "max_length": 128,
            "eval_max_rows": 4,
            "merge": family.dtype != torch.float32,
        },
        dpo={**_STEPS, "max_length": 128, "eval_max_rows": 4},
        evaluate={
            "perplexity": {"max_length": 64, "stride": 32, "max_tokens": 500},
            "answers": {"max_rows": 4, "max_length": 128},
            "generation_rows": 2,
        },
        # Sampling: a tiny tied model, greedy, repeats the prompt's last token ("\n"), which
        # strips to nothing; stop tokens under greedy are tests/unit/test_templates.py's.
        generation={"max_new_tokens": 8, "strategy": "sample", "temperature": 1.0, "top_k": 0},
        compute={"isolate": False},
    )
    d["data"]["sources"] = [
        {"path": "demo:pydoc_topics", "format": "text", "max_rows": 16},
        {"path": "demo:stdlib_qa", "format": "alpaca", "max_rows": 24},
        {"path": "demo:stdlib_preference", "format": "preference", "max_rows": 24},
    ]
    return write_config(shared["tmp"] / f"{family.name}.yaml", d)


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize(
    "family",
    [pytest.param(f, id=f.name, marks=[pytest.mark.slow] if f.slow else []) for f in FAMILIES],
)
def test_family_runs_every_stage_and_answers(shared: dict[str, Any], family) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = build_family(family, shared["tmp"] / family.name, shared["texts"])
    path = family_config(shared, family, model_dir)
    summary = pipeline(PipelineParams(config=str(path)))
    cfg = load_config(path)
    store = ArtifactStore(cfg.store)
    refs = {s.step: store.lookup(s.step.split(":")[0], s.key) for s in summary.steps}
    assert {s.split(":")[0] for s in refs} == set(STEPS) - {"export"}  # export.formats is empty
    assert all(refs.values())  # every step published
    assert {"evaluate:base", "evaluate:pretrain", "evaluate:sft", "evaluate:dpo"} <= set(refs)

    sft, dpo = refs["sft"].metrics, refs["dpo"].metrics
    assert sft["quantization"].startswith("4bit-")  # QLoRA really ran in 4-bit
    assert sft["trainable_tensors"] > 0
    for m in (sft, dpo):
        assert m["trainable_tensors_unchanged"] == 0

    # The adapter names its own base (the continued-pretrained model), stock peft loads it
    # there, and it changes the logits.
    pretrained = Path(store.local_path(refs["pretrain"])).resolve()
    for stage in ("sft", "dpo"):
        adapter = Path(store.local_path(refs[stage]))
        base_path = json.loads((adapter / "adapter_config.json").read_text())[
            "base_model_name_or_path"
        ]
        assert Path(base_path) == pretrained
        manifest = store.read_manifest(stage, refs[stage].key)
        assert manifest["base_model"]["key"] == refs["pretrain"].key
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        ids = AutoTokenizer.from_pretrained(base_path)("def f(x): return x", return_tensors="pt")
        before = _logits(base, ids["input_ids"])
        tuned = PeftModel.from_pretrained(base, str(adapter))
        assert not torch.allclose(before, _logits(tuned, ids["input_ids"]))

    # Weights come back in the base's dtype (a bf16 base stays bf16).
    merged = Path(store.local_path(refs["sft"])) / "merged"
    for out in (pretrained, merged) if merged.exists() else (pretrained,):
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
        assert dtypes == {"BF16" if family.dtype == torch.bfloat16 else "F32"}, out

    # Documents start with BOS exactly where the tokenizer adds one itself.
    tok = AutoTokenizer.from_pretrained(model_dir)
    blocks = pq.read_table(Path(store.local_path(refs["pack"])) / "train.parquet")
    flat = [t for row in blocks.column("input_ids").to_pylist() for t in row]
    bos_count = flat.count(tok.bos_token_id) if tok.bos_token_id is not None else 0
    if family.add_bos:
        assert bos_count == refs["pack"].metrics["train_docs"]
    elif tok.bos_token_id != tok.eos_token_id:
        assert bos_count == 0

    result = CliRunner().invoke(app, ["ask", str(path), "What does `json.dumps` do?"])
    assert result.exit_code == 0, result.output
    answer = result.stdout.split("\n", 1)[0]
    assert answer.startswith(f"dpo ({refs['dpo'].short}):")
    assert "produced no text" not in answer and len(answer) > len("dpo (123456789012): ")
