"""Non-finite loss guard for every training stage (pretrain, SFT, DPO).

A NaN/inf loss silently poisons the weights: the Trainer's `logging_nan_inf_filter` only hides it
from the logged average, and AdamW then writes NaN into every parameter. The guard watches each
micro-batch's loss (by wrapping `trainer.training_step`, the Trainer's documented override
point) and the gradients just before each optimizer step (`on_pre_optimizer_step`), then:

- `nan_policy: abort` (default): raise `TrainingError` naming the stage and the step. The stage's
  build fails inside its staging dir, so nothing is published.
- `nan_policy: skip`: make that optimizer step a no-op (gradients set to None, so torch optimizers
  skip every parameter: no update, no moment or weight-decay change), count it, and abort once
  more than `max_skipped_steps` steps were skipped. With fp16 the GradScaler already skips steps
  whose gradients overflowed (that is normal for it), so only the loss is checked and counted.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from fasttrack.core.config import TrainingConfig
from fasttrack.core.errors import FastTrackError
from fasttrack.core.log import get_logger


class TrainingError(FastTrackError):
    """Training diverged (non-finite loss or gradients): a config/data problem, not a retry."""


class LossGuard(TrainerCallback):
    """Watches losses and gradients of one trainer; see the module docstring. Losses stay on
    the device until the optimizer step: one sync per step, not one per micro-batch."""

    def __init__(self, trainer: Any, stage: str, policy: str = "abort", max_skipped: int = 10):
        self.trainer, self.stage = trainer, stage
        self.policy, self.max_skipped = policy, max_skipped
        self.skipped: list[int] = []  # optimizer steps (1-based) that made no update
        self.losses: list[torch.Tensor] = []  # micro-batch losses of the current step
        self.log = get_logger()

    def wrap(self, training_step: Any) -> Any:
        def guarded(model: Any, inputs: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
            loss = training_step(model, inputs, *args, **kwargs)
            self.losses.append(loss.detach())
            return loss

        return guarded

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        losses, self.losses = self.losses, []
        scaler = getattr(self.trainer.accelerator, "scaler", None)
        grads = [] if scaler is not None else gradients(optimizer)  # fp16: the scaler's job
        losses_ok, grads_ok = finite_flags([losses, grads], across_ranks=True)
        if losses_ok and grads_ok:
            return
        bad = next((float(x.float().mean()) for x in losses if not finite_flags([[x]])[0]), None)
        problem = (
            f"loss is {bad}" if bad is not None
            else "loss is not finite on another rank" if not losses_ok
            else "gradients are not finite"
        )  # fmt: skip
        if self.policy == "abort":
            raise self._error(problem)
        self.skipped.append(self._step())
        if len(self.skipped) > self.max_skipped:
            raise self._error(
                f"{problem}; {len(self.skipped)} steps skipped, over max_skipped_steps "
                f"({self.max_skipped})"
            )
        if scaler is None:  # the GradScaler skips non-finite steps itself
            optimizer.zero_grad(set_to_none=True)
        self.log.warning("%s: step %d skipped (%s)", self.stage, self._step(), problem)

    def _step(self) -> int:
        return self.trainer.state.global_step + 1

    def _error(self, problem: str) -> TrainingError:
        return TrainingError(
            f"{self.stage}: {problem} at step {self._step()}; nothing published. Lower "
            f"{self.stage}.learning_rate, check the data, or set {self.stage}.nan_policy: skip"
        )

    def metrics(self) -> dict[str, Any]:
        return {"skipped_steps": len(self.skipped)} if self.policy == "skip" else {}


def gradients(optimizer: Any) -> list[torch.Tensor]:
    """The gradients the optimizer is about to apply."""
    return [
        p.grad.detach()
        for group in getattr(optimizer, "param_groups", [])
        for p in group["params"]
        if p.grad is not None
    ]


def finite_flags(groups: list[list[torch.Tensor]], across_ranks: bool = False) -> list[bool]:
    """Per group: every element of every tensor is finite (one device sync for all groups).
    Sharded (FSDP2 DTensor) gradients are checked shard by shard; `across_ranks` makes each flag
    one collective verdict, so every rank skips or aborts the same step (a rank alone would
    leave the others waiting in a collective). Every rank runs the collective, empty or not."""
    from torch.distributed.tensor import DTensor

    distributed = (
        across_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    )
    if distributed and "nccl" in str(dist.get_backend()):  # NCCL reduces CUDA tensors only
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = next((t.device for g in groups for t in g), torch.device("cpu"))
    flags = torch.stack([
        torch.stack([
            torch.isfinite(t.to_local() if isinstance(t, DTensor) else t).all().to(device)
            for t in group
        ]).all() if group else torch.ones((), dtype=torch.bool, device=device)
        for group in groups
    ])  # fmt: skip
    if distributed:
        flags = flags.to(torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    return [bool(f) for f in flags.tolist()]


def guard_training(trainer: Any, stage: str, section: TrainingConfig | None = None) -> LossGuard:
    """Install the guard on a HF/TRL trainer; the default (no section) is abort."""
    policy = section.nan_policy if section else "abort"
    guard = LossGuard(trainer, stage, policy, section.max_skipped_steps if section else 10)
    trainer.training_step = guard.wrap(trainer.training_step)
    trainer.add_callback(guard)
    return guard
