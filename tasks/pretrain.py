"""Continued pretraining: HF `Trainer` on the packed blocks, resumable from the last checkpoint.

Checkpoints go to the store's deterministic work dir of this key, so when a run is killed (or a
Prefect retry starts) the next attempt at the same key resumes from the last checkpoint instead
of step 0; the work dir is removed once the model is published.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from tasks.config import RunConfig
from tasks.models import load_model, pick_device, pick_dtype
from tasks.progress import ProgressCallback
from tasks.stage import BuildResult, StageSpec, run_stage, stage_task
from tasks.store import ArtifactRef, ArtifactStore

VERSION = "1"
# Knobs that change what is logged or how often it is saved, not the trained weights.
_NOT_IN_KEY = {"logging_steps", "save_steps", "save_total_limit"}


def pretrain_spec(cfg: RunConfig, packed: ArtifactRef, base: ArtifactRef) -> StageSpec:
    config = cfg.pretrain.model_dump(mode="json", exclude=_NOT_IN_KEY) | {"seed": cfg.seed}
    return StageSpec("pretrain", VERSION, config, upstream={"pack": packed, "base": base})


def collate_blocks(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Fixed-length blocks -> tensors; padded positions are masked out of attention and loss."""
    ids = torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)
    mask = torch.tensor([r["attention_mask"] for r in rows], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def precision_flags(precision: str) -> dict[str, bool]:
    """bf16/fp16 autocast flags for TrainingArguments (fp32 master weights either way)."""
    dtype = pick_dtype(precision)
    if pick_device() == "cpu" and precision == "auto":
        dtype = torch.float32
    return {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}


def checkpoint_complete(path: Path) -> bool:
    """A checkpoint a kill did not interrupt: weights, optimizer and a parsable trainer state
    (the Trainer writes trainer_state.json after the weights and optimizer)."""
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    weights = any(path.glob("*.safetensors"))
    return weights and (path / "optimizer.pt").is_file()


def last_checkpoint(work: Path) -> tuple[str | None, int]:
    """Newest complete checkpoint in the work dir and its step; half-written ones are removed."""
    found = sorted(
        (int(p.name.rsplit("-", 1)[1]), p)
        for p in (work.glob("checkpoint-*") if work.is_dir() else [])
        if p.name.rsplit("-", 1)[1].isdigit()
    )
    for step, path in reversed(found):
        if checkpoint_complete(path):
            return str(path), step
        shutil.rmtree(path, ignore_errors=True)
    return None, 0


def train_causal_lm(
    cfg: RunConfig, stage: str, key: str, model: Any, train: Any, val: Any, out: Path
) -> dict[str, Any]:
    """Run the HF Trainer with resume-from-checkpoint; returns metrics and writes the log."""
    from transformers import PrinterCallback, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our callback reports progress; no tqdm noise in logs

    p = cfg.pretrain
    store = ArtifactStore(cfg.store)
    work = store.work_dir(stage, key)
    args = TrainingArguments(
        output_dir=str(work),
        max_steps=p.max_steps,
        per_device_train_batch_size=p.per_device_batch_size,
        per_device_eval_batch_size=p.per_device_batch_size,
        gradient_accumulation_steps=p.gradient_accumulation_steps,
        learning_rate=p.learning_rate,
        lr_scheduler_type=p.lr_scheduler,
        warmup_steps=p.warmup_ratio,  # a float < 1 is a ratio of max_steps in transformers 5
        weight_decay=p.weight_decay,
        max_grad_norm=p.max_grad_norm,
        activation_checkpointing=p.gradient_checkpointing,
        use_cpu=pick_device() == "cpu",
        **precision_flags(p.precision),
        logging_steps=p.logging_steps,
        eval_strategy="steps" if val is not None else "no",
        eval_steps=p.eval_steps,
        save_strategy="steps",
        save_steps=p.save_steps,
        save_total_limit=p.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=val,
        data_collator=collate_blocks,
        callbacks=[ProgressCallback(stage)],
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw dicts; ProgressCallback logs them
    resume, start = last_checkpoint(work)
    result = trainer.train(resume_from_checkpoint=resume)
    final_eval = trainer.evaluate() if val is not None else {}
    trainer.save_model(str(out))
    history = trainer.state.log_history
    (out / "log_history.json").write_text(json.dumps(history, indent=2))
    losses = [h["loss"] for h in history if "loss" in h]
    metrics: dict[str, Any] = {
        "steps": trainer.state.global_step,
        "resumed_from_step": start,
        "train_loss": round(result.training_loss, 5),
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "train_seconds": round(result.metrics.get("train_runtime", 0.0), 2),
    }
    if "eval_loss" in final_eval:
        metrics["eval_loss"] = round(final_eval["eval_loss"], 5)
        metrics["eval_perplexity"] = round(math.exp(min(final_eval["eval_loss"], 50)), 3)
    return metrics


def build_pretrain(cfg: RunConfig, spec: StageSpec, out: Path) -> BuildResult:
    import datasets

    store = ArtifactStore(cfg.store)
    packed = store.local_path(spec.upstream["pack"])
    model, tok = load_model(cfg, spec.upstream["base"], dtype=torch.float32)
    train = datasets.Dataset.from_parquet(str(packed / "train.parquet"))
    val = datasets.Dataset.from_parquet(str(packed / "validation.parquet"))
    if cfg.pretrain.eval_max_blocks:
        val = val.select(range(min(len(val), cfg.pretrain.eval_max_blocks)))
    metrics = train_causal_lm(
        cfg, "pretrain", spec.key, model, train, val if len(val) else None, out
    )
    tok.save_pretrained(out)
    p = cfg.pretrain
    tokens = (
        metrics["steps"] * p.per_device_batch_size * p.gradient_accumulation_steps * p.block_size
    )
    metrics["train_tokens"] = tokens
    if metrics["train_seconds"]:
        run_tokens = tokens * (1 - metrics["resumed_from_step"] / max(metrics["steps"], 1))
        metrics["tokens_per_second"] = round(run_tokens / metrics["train_seconds"], 1)
    flags = precision_flags(p.precision)
    dtype = "bf16" if flags["bf16"] else "fp16" if flags["fp16"] else "fp32"
    return BuildResult(metrics=metrics, device={"device": pick_device(), "dtype": dtype})


def pretrain(
    cfg: RunConfig, packed: ArtifactRef, base: ArtifactRef, force: bool = False
) -> ArtifactRef:
    """Continued pretraining stage: `fasttrack run --stages pretrain`."""
    spec = pretrain_spec(cfg, packed, base)
    return run_stage(
        ArtifactStore(cfg.store), spec, lambda out: build_pretrain(cfg, spec, out), force
    )


pretrain_task = stage_task(pretrain_spec, name="pretrain", retries=1, retry_delay_seconds=5)(
    pretrain
)
