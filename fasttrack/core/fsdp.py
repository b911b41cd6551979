"""FSDP2 on CPU ranks, and the evidence that a run really was sharded.

accelerate 1.15 turns `--use_fsdp` into `DistributedType.FSDP` only for accelerator backends
(CUDA, XPU, NPU, ...); CPU ranks stay `MULTI_CPU` and would silently train as plain DDP. torch's
FSDP2 (`fully_shard`) itself runs on CPU with the gloo backend, so in a CPU rank launched with
`--use_fsdp` we promote accelerate's state to FSDP exactly as it does for GPUs (same plugin,
same mixed-precision hand-off). Everything after that — wrapping every decoder layer, sharded
optimizer state, gathering the full state dict on save — is accelerate's and transformers' own
FSDP2 code path.
"""

from __future__ import annotations

import os
from typing import Any


def fsdp_requested() -> bool:
    """This process is a rank of a launch with `--use_fsdp`."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def enable_fsdp_on_cpu() -> None:
    """Make accelerate run FSDP2 on CPU/gloo ranks instead of falling back to DDP (idempotent)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__
    if getattr(init, "_fasttrack_fsdp_cpu", False):
        return

    def __init__(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        cpu_fsdp2 = fsdp_plugin is not None and fsdp_plugin.fsdp_version == 2  # FSDP1 needs GPUs
        if cpu_fsdp2 and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            # As accelerate does for GPUs: later `AcceleratorState()` calls copy PartialState's
            # fields over their own, so the promotion must be recorded there too.
            PartialState._shared_state["distributed_type"] = self.distributed_type

    __init__._fasttrack_fsdp_cpu = True  # type: ignore[attr-defined]
    AcceleratorState.__init__ = __init__  # type: ignore[method-assign]


def shard_report(model: Any) -> dict[str, Any]:
    """How the trainable model is held on this rank: FSDP2 parameters are DTensors sharded on
    dim 0, so each rank holds about 1/world_size of them. {} when nothing is sharded."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Shard

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()  # the root stays unsharded after a forward (evaluation); local op

    total = local = sharded = 0
    for p in model.parameters():
        total += p.numel()
        if isinstance(p, DTensor) and any(isinstance(pl, Shard) for pl in p.placements):
            sharded += 1
            local += p.to_local().numel()
        else:
            local += p.numel()
    if not sharded:
        return {}
    return {"fsdp_sharded_params": sharded, "fsdp_local_fraction": round(local / total, 4)}
