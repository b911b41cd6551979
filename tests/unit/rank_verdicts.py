"""A rank of tests/unit/test_guards.py's 2-process gloo group (its own module so spawned ranks
import only torch and fasttrack.lib.guards, not the test module)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def verdicts(rank: int, world: int, port: int, out: str) -> None:
    """One rank of a 2-process gloo group: rank 1 alone sees a NaN; gradients are FSDP-style
    DTensor shards (Shard(0)) of which only rank 1's local part is non-finite."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from fasttrack.lib.guards import finite_flags

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)  # fmt: skip
    mesh = init_device_mesh("cpu", (world,))
    local = torch.ones(2) if rank == 0 else torch.tensor([1.0, float("nan")])
    shard = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
    loss = torch.tensor(0.5)
    result = {
        "local_only": finite_flags([[loss, shard]])[0],
        "across_ranks": finite_flags([[loss, shard]], across_ranks=True)[0],
        "finite_across": finite_flags([[loss, torch.ones(3)]], across_ranks=True)[0],
        # rank 1's loss alone is NaN, no rank has gradients: flags per group, collective anyway
        "loss_grads": finite_flags(
            [[torch.tensor(float("nan") if rank else 0.5)], []], across_ranks=True
        ),
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()
