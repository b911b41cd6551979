"""tasks/fsdp.py: the accelerate promotion on 2 real CPU ranks; nothing sharded reports nothing
(training under FSDP end to end: tests/e2e/test_distributed.py)."""

from __future__ import annotations

import torch

from fasttrack.core.fsdp import enable_fsdp_on_cpu, shard_report


def test_plain_model_reports_no_sharding() -> None:
    assert shard_report(torch.nn.Linear(4, 4)) == {}


def test_promotion_is_idempotent(monkeypatch) -> None:
    from accelerate.state import AcceleratorState

    monkeypatch.setattr(AcceleratorState, "__init__", AcceleratorState.__init__)  # restored after
    enable_fsdp_on_cpu()
    patched = AcceleratorState.__init__
    enable_fsdp_on_cpu()
    assert AcceleratorState.__init__ is patched  # wrapped once


def test_cpu_ranks_launched_with_fsdp_become_fsdp2(tmp_path) -> None:
    """Stock accelerate turns 2 CPU ranks launched with --use_fsdp into MULTI_CPU (DDP); with
    the promotion they are FSDP2, and stay so when library code re-creates AcceleratorState."""
    import json

    import torch.multiprocessing as mp

    from fasttrack.core.compute import free_port
    from tests.unit.rank_accelerate import promotion

    mp.spawn(promotion, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["requested"] and r["stock"] == "DistributedType.MULTI_CPU", r
        assert r["patched"] == r["after_reinit"] == "DistributedType.FSDP" and r["is_fsdp2"], r
