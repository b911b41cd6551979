"""What every training stage shares: Trainer arguments, resume from the newest complete
checkpoint, progress reporting and the metrics a trainer leaves behind.

Pretraining uses the HF `Trainer`, SFT and DPO the TRL trainers (its subclasses), so one set of
helpers serves all three and they behave alike: same knobs, same resume, same logs.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fasttrack.core import forkserver
from fasttrack.core.compute import launch_prefix
from fasttrack.core.config import RunConfig, TrainingConfig
from fasttrack.core.fsdp import shard_report
from fasttrack.core.isolation import finish_if_not_rank0, run_isolated
from fasttrack.core.lazy import lazy
from fasttrack.core.store import ArtifactStore
from fasttrack.lib.models import pick_device, pick_dtype

torch = lazy("torch")  # imported on first use: a cached run never needs it

# TRL's configs still take `gradient_checkpointing` (transformers 5 calls it activation_...).
warnings.filterwarnings(
    "ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning
)


def precision_flags(precision: str) -> dict[str, bool]:
    """bf16/fp16 autocast flags for TrainingArguments (fp32 master weights either way)."""
    dtype = (
        torch.float32 if pick_device() == "cpu" and precision == "auto" else pick_dtype(precision)
    )
    return {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}


def dtype_name(precision: str) -> str:
    flags = precision_flags(precision)
    return "bf16" if flags["bf16"] else "fp16" if flags["fp16"] else "fp32"


def trainer_kwargs(t: TrainingConfig, work: Path, seed: int, has_eval: bool) -> dict[str, Any]:
    """Keyword arguments valid for TrainingArguments and its TRL subclasses (SFT/DPOConfig)."""
    return {
        "output_dir": str(work),
        "max_steps": t.max_steps,
        "per_device_train_batch_size": t.per_device_batch_size,
        "per_device_eval_batch_size": t.per_device_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": t.lr_scheduler,
        "warmup_steps": t.warmup_ratio,  # a float < 1 is a ratio of max_steps in transformers 5
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "gradient_checkpointing": t.gradient_checkpointing,  # TRL configs default it to True
        "optim": t.optimizer,
        "use_cpu": pick_device() == "cpu",
        **precision_flags(t.precision),
        "logging_steps": t.logging_steps,
        "eval_strategy": "steps" if has_eval else "no",
        "eval_steps": t.eval_steps,
        "save_strategy": "steps",
        "save_steps": t.save_steps,
        "save_total_limit": t.save_total_limit,
        "seed": seed,
        "data_seed": seed,
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


# Optimizer state as the Trainer writes it: plain/DDP, and FSDP with the full state dict (the
# launcher's setting; with a sharded one the Trainer writes no weights file to check).
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")


def checkpoint_complete(path: Path) -> bool:
    """A checkpoint a kill did not interrupt: weights, optimizer and a parsable trainer state
    (the Trainer writes trainer_state.json after the weights and optimizer)."""
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    weights = any(path.glob("*.safetensors"))
    return weights and any((path / name).is_file() for name in OPTIMIZER_FILES)


def last_checkpoint(work: Path, below: int | None = None) -> tuple[str | None, int]:
    """Newest complete checkpoint in the work dir and its step; half-written ones are removed.

    `below` (the run's max_steps): checkpoints at or past it are removed too, so the run resumes
    from the one before. Why: the Trainer checks max_steps only after a step, so a run resumed
    from its final checkpoint (killed after saving it, before publishing) would train one step
    more than asked and publish that."""
    found = sorted(
        (int(p.name.rsplit("-", 1)[1]), p)
        for p in (work.glob("checkpoint-*") if work.is_dir() else [])
        if p.name.rsplit("-", 1)[1].isdigit()
    )
    for step, path in reversed(found):
        if checkpoint_complete(path) and (below is None or step < below):
            return str(path), step
        shutil.rmtree(path, ignore_errors=True)
    return None, 0


FULL_BELOW = 1 << 20  # bytes free under which a failed write is taken for a full disk
# how torch's zip writer and safetensors word a failed write (neither raises OSError(ENOSPC))
_WRITE_FAILURE = re.compile(
    r"file write failed|unexpected pos|PytorchStreamWriter|SafetensorError|serializ|"
    r"StorageFull|No space left|os error 28",
    re.IGNORECASE,
)


@contextmanager
def disk_full_is_oserror(work: Path, out: Path) -> Iterator[None]:
    """A full disk while a checkpoint (in `work`) or the model (in `out`) is written becomes one
    `OSError(ENOSPC, path)`, which `run_stage` reports as one line, and the torn checkpoint is
    removed. torch's zip writer reports a full disk as a RuntimeError ("unexpected pos ...",
    "file write failed") and safetensors as its own error type, so besides an ENOSPC in the
    exception chain the free space left on the failing filesystem decides."""
    try:
        yield
    except Exception as exc:
        chain, e = [], exc
        while e is not None and len(chain) < 20:
            chain.append(e)
            e = e.__cause__ or e.__context__
        enospc = any(
            isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in chain
        )
        writing = any(_WRITE_FAILURE.search(f"{type(e).__name__}: {e}") for e in chain)
        full = [p for p in (work, out) if p.is_dir() and shutil.disk_usage(p).free < FULL_BELOW]
        if not enospc and not (writing and full):  # a bug on a nearly full disk stays a bug
            raise
        torn = sorted(work.glob("checkpoint-*"), key=lambda p: p.stat().st_mtime)
        last_checkpoint(work)  # removes the half-written checkpoint
        where = torn[-1] if torn and not checkpoint_complete(torn[-1]) else (full or [work])[0]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where)) from exc


def run_trainer(
    trainer: Any,
    stage: str,
    work: Path,
    out: Path,
    eval_before: bool = False,
    section: TrainingConfig | None = None,
    after: Callable[[Any], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train (resuming if a checkpoint exists), evaluate, save the model to `out`, and return
    the metrics every training stage reports. The log history is saved for loss curves.
    `eval_before` evaluates the untrained starting point first (for before/after figures).
    `after(model)` adds stage metrics computed from the trained model on every rank: under
    FSDP its forward and `full_tensor()` are collectives, so rank 0 cannot do them alone."""
    from transformers import PrinterCallback
    from transformers.utils import logging as hf_logging

    from fasttrack.lib.callbacks import ProgressCallback
    from fasttrack.lib.guards import guard_training

    hf_logging.disable_progress_bar()
    trainer.remove_callback(PrinterCallback)  # prints raw dicts; ProgressCallback logs them
    trainer.add_callback(ProgressCallback(stage))
    guard = guard_training(trainer, stage, section)  # non-finite loss: abort or skip the step
    max_steps = trainer.args.max_steps
    resume, start = last_checkpoint(work, below=max_steps if max_steps > 0 else None)
    if eval_before and trainer.eval_dataset is not None and start == 0:
        # Evaluated inside train(), after the model is wrapped: a trainer.evaluate() before
        # train() leaves DDP ranks training unsynchronised (each on its own shard).
        trainer.args.eval_on_start = True
    with disk_full_is_oserror(work, out):
        cpu_start = time.process_time()  # all threads: a figure other jobs' load barely moves
        result = trainer.train(resume_from_checkpoint=resume)
        train_cpu = time.process_time() - cpu_start
        final_eval = final_evaluation(trainer)
        sharding = shard_report(trainer.model)  # FSDP2: this rank's share of the parameters
        trainer.save_model(str(out))  # collective under FSDP (gathers the full state dict)
    extra = after(trainer.model) if after else {}
    finish_if_not_rank0()  # other ranks stop here; rank 0 writes everything below
    history = trainer.state.log_history
    (out / "log_history.json").write_text(json.dumps(history, indent=2))
    losses = [h["loss"] for h in history if "loss" in h]
    metrics: dict[str, Any] = {
        "steps": trainer.state.global_step,
        "world_size": trainer.args.world_size,
        "resumed_from_step": start,
        "train_loss": round(result.training_loss, 5),
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "train_seconds": round(result.metrics.get("train_runtime", 0.0), 2),
        "train_cpu_seconds": round(train_cpu, 2),  # this rank's process, spin-waits included
        **guard.metrics(),
        **sharding,
        **extra,
    }
    if "eval_loss" in final_eval:
        metrics["eval_loss"] = round(final_eval["eval_loss"], 5)
        metrics["eval_perplexity"] = round(math.exp(min(final_eval["eval_loss"], 50)), 3)
    before = [h for h in history if h.get("step") == 0 and "eval_loss" in h]
    if eval_before and before:  # kept in the trainer state across a resume
        metrics["eval_loss_before"] = round(before[0]["eval_loss"], 5)
    for name, value in final_eval.items():
        if name.startswith("eval_rewards/") and isinstance(value, int | float):
            metrics[name.removeprefix("eval_")] = round(value, 5)
    return metrics


def final_evaluation(trainer: Any) -> dict[str, Any]:
    """The trained model's eval metrics: the in-loop evaluation of the last step when the
    schedule already ran one there (eval_steps divides max_steps), else a fresh evaluate().
    Evaluating the same weights twice cost a full validation pass per training stage. Every
    rank sees the same history and step, so under DDP/FSDP all take the same branch (the
    evaluate() collective stays matched)."""
    if trainer.eval_dataset is None:
        return {}
    step = trainer.state.global_step
    for entry in reversed(trainer.state.log_history):
        if "eval_loss" in entry:
            if entry.get("step") == step:
                return {k: v for k, v in entry.items() if k.startswith("eval_")}
            break
    return trainer.evaluate()


GUARD_FIELDS = {"nan_policy", "max_skipped_steps"}  # fasttrack/lib/guards.py


def not_in_key(section: TrainingConfig) -> set[str]:
    """Guard knobs that cannot change a published result: with `abort` a run either matches one
    without the guard or publishes nothing, so existing keys stay valid. `skip` can publish
    weights that missed some steps, so then the knobs are part of the key."""
    return GUARD_FIELDS if section.nan_policy == "abort" else set()


# Knobs that change what is logged or how often it is saved, not the trained weights.
NOT_IN_KEY = {"logging_steps", "save_steps", "save_total_limit", "timeout_minutes"}
NOT_IN_KEY |= {"lora", "quantization"}  # deprecated sft fields, moved to `adapter` on load


def train_stage(cfg: RunConfig, stage: str, build: Callable[..., Any], *args: Any) -> Any:
    """Run a training stage's `build(*args)`: in a killable child process unless
    `compute.isolate` is off, stopped after `<stage>.timeout_minutes`."""
    if not cfg.compute.isolate:
        return build(*args)
    section: TrainingConfig = getattr(cfg, stage)
    timeout = section.timeout_minutes * 60 if section.timeout_minutes else None
    mixed = {"bf16": "bf16", "fp16": "fp16"}.get(dtype_name(section.precision), "no")
    launcher = launch_prefix(cfg.compute, mixed)
    return run_isolated(build, *args, stage=stage, timeout_s=timeout, launcher=launcher)


TRAINING_STAGES = ("pretrain", "sft", "dpo")


def prestart_children(cfg: RunConfig, wanted: Iterable[str], cold: bool | None = None) -> bool:
    """Start the training fork server now when this run will surely train in a child, so its
    imports (~20 s on 2 cores) overlap the Prefect API start and the data steps instead of
    delaying the first training stage. `cold`: the caller knows whether the chain will be
    rebuilt (the data step executed); None: only a store with no artifact at all counts as
    cold (a cached run must not pay for imports it never uses). Main thread only (see
    `forkserver.prestart`). Returns whether it started one."""
    c = cfg.compute
    if not c.isolate or c.num_processes > 1 or not set(TRAINING_STAGES) & set(wanted):
        return False
    if cold is None:
        store = ArtifactStore(cfg.store)
        cold = store.local and not any(Path(store.root).glob("*/*/manifest.json"))
    if cold:
        forkserver.prestart()
    return cold


def training_key_config(section: TrainingConfig, seed: int) -> dict[str, Any]:
    """The part of a training section that determines the result (for the stage key)."""
    exclude = NOT_IN_KEY | not_in_key(section)
    return section.model_dump(mode="json", exclude=exclude) | {"seed": seed}
