"""SFT on 2 CPU ranks through the real launch path (accelerate launch -> torchrun -> gloo DDP):
both ranks train, rank 0 alone publishes, and the adapter equals a 1-process run with the same
global batch (up to float reduction order)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.config import load_config
from tasks.store import ArtifactStore
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


def test_fsdp_on_cpu_is_refused_not_silently_ddp(tmp_path, tiny_cfg_path):
    from tasks.errors import ConfigError
    from tasks.training import train_stage

    cfg = load_config(tiny_cfg_path, ["compute.num_processes=2", "compute.strategy=fsdp"])
    with pytest.raises(ConfigError, match="compute.strategy: fsdp needs CUDA"):
        train_stage(cfg, "sft", print)
