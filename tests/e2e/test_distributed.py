"""SFT on 2 CPU ranks through the real launch path (accelerate launch -> torchrun -> gloo DDP):
both ranks train, rank 0 alone publishes, and the adapter equals a 1-process run with the same
global batch (up to float reduction order)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fasttrack.core.config_loader import load_config
from fasttrack.core.store import ArtifactStore
from tests.conftest import tiny_config_dict, write_config

pytestmark = pytest.mark.e2e


def sft_run(tmp_path: Path, name: str, processes: int, per_device: int) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    from flows.pipeline import PipelineParams, pipeline

    d = tiny_config_dict(
        tmp_path / name, dpo={"enabled": False}, rag={"enabled": False},
        compute={"num_processes": processes},
    )  # fmt: skip
    # Within the first epoch (48 rows / global batch 8): same samples per optimizer step.
    d["sft"] |= {"per_device_batch_size": per_device, "max_steps": 4, "eval_steps": 4}
    d["sft"]["lora"] = {"lora_dropout": 0.0}  # dropout masks depend on the per-rank batch
    cfg_path = write_config(tmp_path / f"{name}.yaml", d)
    pipeline(PipelineParams(config=str(cfg_path), stages=["data", "sft"]))
    store = ArtifactStore(load_config(cfg_path).store)
    sft = [m for m in store.manifests() if m["stage"] == "sft"]
    assert len(sft) == 1  # published once, by rank 0
    path = store.local_path(store.lookup("sft", sft[0]["key"]))
    return sft[0]["metrics"], load_file(path / "adapter_model.safetensors")


def test_two_ranks_equal_one_process_with_the_same_global_batch(tmp_path, prefect_harness):
    two, adapter2 = sft_run(tmp_path, "two", processes=2, per_device=4)
    one, adapter1 = sft_run(tmp_path, "one", processes=1, per_device=8)
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["steps"] == one["steps"] == 4
    assert adapter1.keys() == adapter2.keys()
    for name, w1 in adapter1.items():
        if "lora_B" in name:  # starts at 0: its norm is what training moved
            assert w1.norm() > 0, name
        diff = float((adapter2[name] - w1).norm() / w1.norm())
        assert diff < 0.02, f"{name}: 2-rank and 1-process adapters differ by {diff:.3%}"


def fsdp_run(tmp_path: Path, name: str, dpo: bool = False, **compute) -> tuple:
    """data -> pretrain (full model) -> SFT (QLoRA adapter) [-> DPO] on a 2-layer model;
    global batch 8 in pretraining. Returns the store and the manifests by stage."""
    from flows.pipeline import PipelineParams, pipeline

    d = tiny_config_dict(
        tmp_path / name, dpo={"enabled": dpo}, rag={"enabled": False}, compute=compute
    )
    d["model"]["architecture"]["num_hidden_layers"] = 2  # two decoder layers to wrap
    per_device = 8 // compute.get("num_processes", 1)
    d["pretrain"] |= {"max_steps": 6, "eval_steps": 6, "save_steps": 6,
                      "per_device_batch_size": per_device}  # fmt: skip
    d["sft"] |= {"max_steps": 3, "eval_steps": 3}
    d["dpo"] |= {"max_steps": 2, "eval_steps": 2}
    cfg_path = write_config(tmp_path / f"{name}.yaml", d)
    stages = ["data", "pretrain", "sft", *(["dpo"] if dpo else [])]
    pipeline(PipelineParams(config=str(cfg_path), stages=stages))
    store = ArtifactStore(load_config(cfg_path).store)
    found = [m for m in store.manifests() if m["stage"] in ("base", *stages[1:])]
    assert sorted(m["stage"] for m in found) == sorted(["base", *stages[1:]])  # published once
    return store, {m["stage"]: m for m in found}


def test_fsdp_on_cpu_shards_and_publishes_stock_loadable_models(tmp_path, prefect_harness):
    """FSDP2 on 2 gloo ranks: every parameter sharded (each rank holds half), the full state
    dict gathered into a plain model that stock `from_pretrained` loads with no missing key,
    equal to a 1-process run with the same global batch (up to float reduction order: their
    difference is < 1 % of what training moved); the QLoRA adapter loads in stock peft; DPO's
    post-training metrics (collective forwards on every rank) are computed."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def load(store: ArtifactStore, manifest: dict):
        path = store.local_path(store.lookup(manifest["stage"], manifest["key"]))
        return AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)

    store, fsdp = fsdp_run(tmp_path, "fsdp", dpo=True, num_processes=2, strategy="fsdp")
    pre = fsdp["pretrain"]["metrics"]
    model, info = load(store, fsdp["pretrain"])
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert pre["world_size"] == 2
    assert pre["fsdp_sharded_params"] == len(list(model.parameters()))
    assert pre["fsdp_local_fraction"] == pytest.approx(0.5, abs=0.01)

    one_store, one = fsdp_run(tmp_path, "single")  # per-device batch 8 on 1 process
    assert "fsdp_sharded_params" not in one["pretrain"]["metrics"]
    reference = dict(load(one_store, one["pretrain"])[0].named_parameters())
    start = dict(load(one_store, one["base"])[0].named_parameters())  # same init in both
    for name, w in model.named_parameters():
        moved = (reference[name] - start[name]).norm()
        assert moved > 0, name
        diff = float((w - reference[name]).norm() / moved)
        assert diff < 1e-2, f"{name}: FSDP and 1-process differ by {diff:.2%} of the update"

    sft = fsdp["sft"]["metrics"]
    assert sft["world_size"] == 2 and sft["fsdp_sharded_params"] > 0
    assert sft["quantization"].startswith("4bit"), sft["quantization"]  # QLoRA, not a fallback
    assert sft["trainable_tensors_unchanged"] == 0  # every LoRA tensor moved
    adapter = store.local_path(store.lookup("sft", fsdp["sft"]["key"]))
    lora = PeftModel.from_pretrained(model, adapter)  # stock peft
    assert sum("lora_B" in n for n, _ in lora.named_parameters()) == sft["trainable_tensors"] / 2

    dpo = fsdp["dpo"]["metrics"]
    assert dpo["world_size"] == 2 and dpo["fsdp_sharded_params"] > 0
    assert dpo["trainable_tensors_unchanged"] == 0
    assert 0.0 <= dpo["pref_accuracy"] <= 1.0 and math.isfinite(dpo["pref_margin"])
