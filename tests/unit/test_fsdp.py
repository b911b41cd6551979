"""tasks/fsdp.py outside a launch: nothing sharded is reported as nothing, and the accelerate
promotion leaves a non-FSDP state alone (2-rank effects: tests/e2e/test_distributed.py)."""

from __future__ import annotations

import torch

from tasks.fsdp import enable_fsdp_on_cpu, fsdp_requested, shard_report


def test_plain_model_reports_no_sharding() -> None:
    assert shard_report(torch.nn.Linear(4, 4)) == {}


def test_promotion_is_idempotent_and_needs_an_fsdp_plugin(monkeypatch) -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not fsdp_requested()
    monkeypatch.setattr(AcceleratorState, "__init__", AcceleratorState.__init__)  # restored after
    enable_fsdp_on_cpu()
    patched = AcceleratorState.__init__
    enable_fsdp_on_cpu()
    assert AcceleratorState.__init__ is patched  # wrapped once
    try:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)  # one process, no plugin: untouched
        assert accelerator.distributed_type == DistributedType.NO
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState._reset_state()
