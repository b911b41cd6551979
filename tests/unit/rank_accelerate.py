"""A rank of tests/unit/test_fsdp.py's 2-process gloo launch (its own module so spawned ranks
import only accelerate and fasttrack.core.fsdp)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def promotion(rank: int, world: int, port: int, out: str) -> None:
    """What accelerate makes of a CPU rank launched with --use_fsdp, without and with the patch
    (environment as `accelerate launch --use_fsdp --fsdp_version 2` sets it with no GPU)."""
    os.environ |= {
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
        "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
        "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "ACCELERATE_USE_CPU": "true",
    }  # fmt: skip
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from fasttrack.core.fsdp import enable_fsdp_on_cpu, fsdp_requested

    result: dict[str, object] = {"requested": fsdp_requested()}
    result["stock"] = str(Accelerator().distributed_type)
    AcceleratorState._reset_state(reset_partial_state=True)
    enable_fsdp_on_cpu()
    accelerator = Accelerator()
    result["patched"] = str(accelerator.distributed_type)
    result["is_fsdp2"] = accelerator.is_fsdp2
    # later bare AcceleratorState() calls (library code makes many) must keep the promotion
    result["after_reinit"] = str(AcceleratorState().distributed_type)
    accelerator.wait_for_everyone()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
