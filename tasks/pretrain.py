"""Continued pretraining: HF `Trainer` on the packed blocks, resumable from the last checkpoint.

Checkpoints go to the store's deterministic work dir of this key, so when a run is killed (or a
Prefect retry starts) the next attempt at the same key resumes from the last checkpoint instead
of step 0; the work dir is removed once the model is published.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fasttrack.core.config import RunConfig
from fasttrack.core.lazy import lazy
from fasttrack.core.stage import BuildResult, Stage, StageSpec
from fasttrack.core.store import ArtifactRef, ArtifactStore
from fasttrack.lib.models import cast_checkpoint, load_model, pick_device, target_dtype
from fasttrack.lib.training import (
    dtype_name,
    run_trainer,
    train_stage,
    trainer_kwargs,
    training_key_config,
)

torch = lazy("torch")  # imported on first use: a cached run never needs it

STAGE = Stage("pretrain", "1", retries=1, retry_delay_seconds=5)


def pretrain_spec(cfg: RunConfig, packed: ArtifactRef, base: ArtifactRef) -> StageSpec:
    config = training_key_config(cfg.pretrain, cfg.seed)
    if cfg.model.dtype != "auto":  # auto (the base's dtype) keeps the keys it always had
        config["dtype"] = cfg.model.dtype
    return STAGE.spec(config, upstream={"pack": packed, "base": base})


def collate_blocks(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Fixed-length blocks -> tensors; padded positions are masked out of attention and loss."""
    ids = torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)
    mask = torch.tensor([r["attention_mask"] for r in rows], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def build_pretrain(cfg: RunConfig, spec: StageSpec, out: Path) -> BuildResult:
    import datasets
    from transformers import Trainer, TrainingArguments

    store = ArtifactStore(cfg.store)
    packed = store.local_path(spec.upstream["pack"])
    model, tok = load_model(cfg, spec.upstream["base"], dtype=torch.float32)
    train = datasets.Dataset.from_parquet(str(packed / "train.parquet"))
    val = datasets.Dataset.from_parquet(str(packed / "validation.parquet"))
    if cfg.pretrain.eval_max_blocks:
        val = val.select(range(min(len(val), cfg.pretrain.eval_max_blocks)))
    work = store.work_dir("pretrain", spec.key)
    kwargs = trainer_kwargs(cfg.pretrain, work, cfg.seed, has_eval=len(val) > 0)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**kwargs, remove_unused_columns=False),
        train_dataset=train,
        eval_dataset=val if len(val) else None,
        data_collator=collate_blocks,
    )
    metrics = run_trainer(trainer, "pretrain", work, out, section=cfg.pretrain)
    dtype = target_dtype(cfg, spec.upstream["base"])
    cast_checkpoint(out, dtype)  # trained in fp32, published in the base's dtype
    tok.save_pretrained(out)
    p = cfg.pretrain
    tokens = (
        metrics["steps"] * p.per_device_batch_size * p.gradient_accumulation_steps * p.block_size
    )
    metrics["train_tokens"] = tokens
    if metrics["train_seconds"]:
        run_tokens = tokens * (1 - metrics["resumed_from_step"] / max(metrics["steps"], 1))
        metrics["tokens_per_second"] = round(run_tokens / metrics["train_seconds"], 1)
    return BuildResult(
        metrics=metrics,
        device={
            "device": pick_device(),
            "dtype": dtype_name(p.precision),
            "saved_dtype": str(dtype).removeprefix("torch."),
        },
    )


pretrain, pretrain_task = STAGE.define(pretrain_spec, build_pretrain, train_stage)
