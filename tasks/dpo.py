"""DPO alignment of the SFT adapter, with reference log-probs as their own cached artifact.

The reference policy is the SFT policy, which never changes for a given SFT artifact and
preference set. So its log-probs of every chosen/rejected answer are computed once, in the
`dpo_ref` step keyed by (SFT key, data key, tokenization), and stored; every DPO run on top of
it (another `beta`, `loss_type`, learning rate...) reads them instead of running the reference
forward passes again, and needs no reference model in memory at all.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from fasttrack.core.config import RunConfig
from fasttrack.core.errors import ModelError, StoreError
from fasttrack.core.stage import BuildResult, Stage, StageSpec
from fasttrack.core.store import ArtifactRef, ArtifactStore
from fasttrack.lib.adapters import (
    base_lineage,
    load_for_training,
    trainable_snapshot,
    unchanged_tensors,
)
from fasttrack.lib.datasets import read_split
from fasttrack.lib.models import LOAD_LOCK, pick_device
from fasttrack.lib.scoring import preference_accuracy
from fasttrack.lib.training import (
    dtype_name,
    run_trainer,
    train_stage,
    trainer_kwargs,
    training_key_config,
)

REF = Stage("dpo_ref", "1")
# 2: its pref_accuracy(_sft) metrics are length-normalised (fasttrack/lib/scoring.py)
STAGE = Stage("dpo", "2", retries=1, retry_delay_seconds=5)
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def _dpo_trainer_class():
    from trl import DPOTrainer

    class StoredRefDPOTrainer(DPOTrainer):
        """DPOTrainer that takes reference log-probs already present in the dataset (from the
        `dpo_ref` artifact) and counts the reference forward passes it still makes."""

        ref_forward_batches = 0

        def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
            if set(REF_COLUMNS) <= set(dataset.column_names):
                return dataset
            return super()._precompute_ref_logps(dataset, name, batch_size)

        def compute_ref_log_probs(self, model: Any, inputs: Any) -> Any:
            self.ref_forward_batches += 1
            return super().compute_ref_log_probs(model, inputs)

    return StoredRefDPOTrainer


def pair_hash(row: dict[str, str]) -> str:
    return hashlib.sha256(
        "\0".join((row["prompt"], row["chosen"], row["rejected"])).encode()
    ).hexdigest()


def conversational(rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Preference rows in TRL's conversational form, so the chat template applies as in SFT."""
    return [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in rows
    ]


def preference_splits(cfg: RunConfig, data: ArtifactRef) -> dict[str, list[dict[str, str]]]:
    store = ArtifactStore(cfg.store)
    val = read_split(store, data, "preference", "validation")[: cfg.dpo.eval_max_rows]
    return {"train": read_split(store, data, "preference", "train"), "validation": val}


def ref_spec(cfg: RunConfig, model: ArtifactRef, sft: ArtifactRef, data: ArtifactRef) -> StageSpec:
    config = {
        "max_length": cfg.dpo.max_length,
        "eval_max_rows": cfg.dpo.eval_max_rows,
        "quantization": cfg.adapter.quantization.model_dump(mode="json"),
    }
    return REF.spec(config, upstream={"model": model, "sft": sft, "data": data})


def dpo_spec(
    cfg: RunConfig, model: ArtifactRef, sft: ArtifactRef, ref: ArtifactRef, data: ArtifactRef
) -> StageSpec:
    upstream = {"model": model, "sft": sft, "ref": ref, "data": data}
    return STAGE.spec(training_key_config(cfg.dpo, cfg.seed), upstream=upstream)


def _trainer(cfg: RunConfig, policy: Any, tok: Any, splits: dict, work: Path) -> Any:
    import datasets
    from trl import DPOConfig

    d = cfg.dpo
    args = DPOConfig(
        **trainer_kwargs(d, work, cfg.seed, has_eval=bool(splits["validation"])),
        beta=d.beta,
        loss_type=list(d.loss_type),
        max_length=d.max_length,
        precompute_ref_log_probs=True,
        dataset_num_proc=1,
    )
    val = splits["validation"]
    return _dpo_trainer_class()(
        model=policy,
        args=args,
        train_dataset=datasets.Dataset.from_list(splits["train"]),
        eval_dataset=datasets.Dataset.from_list(val) if val else None,
        processing_class=tok,
    )


def _sft_policy(cfg: RunConfig, model: ArtifactRef, sft: ArtifactRef, trainable: bool):
    """The SFT adapter on the base it was trained on (refused on any other base)."""
    from peft import PeftModel

    store = ArtifactStore(cfg.store)
    manifest = store.read_manifest(sft.stage, sft.key) or {}
    trained_on = manifest.get("upstream", {}).get("model")
    if trained_on != model.key:
        raise ModelError(
            f"sft adapter {sft.short} was trained on model {str(trained_on)[:12]}, "
            f"not on {model.stage} {model.short}: DPO needs the adapter's own base"
        )
    base, tok, quant = load_for_training(cfg, model)
    adapter = str(store.local_path(sft))
    with LOAD_LOCK:  # one model load per process at a time (fasttrack/lib/models.py)
        policy = PeftModel.from_pretrained(base, adapter, is_trainable=trainable)
    return policy, tok, quant


def build_ref(cfg: RunConfig, spec: StageSpec, out: Path) -> BuildResult:
    """Reference (SFT policy) log-probs of every chosen/rejected answer, computed once."""
    up = spec.upstream
    policy, tok, quant = _sft_policy(cfg, up["model"], up["sft"], trainable=False)
    splits = preference_splits(cfg, up["data"])
    conv = {name: conversational(rows) for name, rows in splits.items()}
    work = ArtifactStore(cfg.store).work_dir("dpo_ref", spec.key)
    trainer = _trainer(cfg, policy, tok, conv, work)
    metrics: dict[str, Any] = {"ref_forward_batches": trainer.ref_forward_batches}
    for name, ds in (("train", trainer.train_dataset), ("validation", trainer.eval_dataset)):
        if ds is None:
            continue
        columns = {c: ds[c] for c in REF_COLUMNS} | {
            "pair_hash": [pair_hash(r) for r in splits[name]]
        }
        pq.write_table(pa.table(columns), out / f"{name}.parquet")
        wins = [c > r for c, r in zip(*(columns[c] for c in REF_COLUMNS), strict=True)]
        metrics[f"{name}_pairs"] = len(wins)
        metrics[f"{name}_ref_pref_accuracy"] = round(sum(wins) / max(len(wins), 1), 5)
    return BuildResult(metrics=metrics, device={"device": pick_device(), "quantization": quant})


def with_reference(rows: list[dict], ref_dir: Path, split: str) -> list[dict[str, Any]]:
    """Conversational rows joined with their stored reference log-probs (order verified)."""
    table = pq.read_table(ref_dir / f"{split}.parquet").to_pylist()
    if [t["pair_hash"] for t in table] != [pair_hash(r) for r in rows]:
        raise StoreError(f"dpo_ref/{ref_dir.name}: {split} pairs do not match the data artifact")
    return [
        {**conv, **{c: t[c] for c in REF_COLUMNS}}
        for conv, t in zip(conversational(rows), table, strict=True)
    ]


def build_dpo(cfg: RunConfig, spec: StageSpec, out: Path) -> BuildResult:
    up, store = spec.upstream, ArtifactStore(cfg.store)
    policy, tok, quant = _sft_policy(cfg, up["model"], up["sft"], trainable=True)
    splits = preference_splits(cfg, up["data"])
    ref_dir = store.local_path(up["ref"])
    joined = {name: with_reference(rows, ref_dir, name) for name, rows in splits.items() if rows}
    joined.setdefault("validation", [])
    work = store.work_dir("dpo", spec.key)
    max_len = cfg.dpo.max_length
    before_pref = preference_accuracy(policy, tok, splits["validation"], max_len)
    trainer = _trainer(cfg, policy, tok, joined, work)
    before = trainable_snapshot(trainer.model)

    def after(model: Any) -> dict[str, Any]:  # on every rank (FSDP forwards are collective)
        pref = preference_accuracy(model, tok, splits["validation"], max_len)
        return {
            "pref_accuracy": pref["pref_accuracy"],
            "pref_margin": pref["pref_margin"],
            "trainable_tensors_unchanged": len(unchanged_tensors(model, before)),
        }

    metrics = run_trainer(trainer, "dpo", work, out, section=cfg.dpo, after=after)
    tok.save_pretrained(out)
    lineage = base_lineage(cfg, up["model"], out)
    metrics |= {
        "pref_accuracy_sft": before_pref["pref_accuracy"],
        "pref_margin_sft": before_pref["pref_margin"],
        "ref_forward_batches": trainer.ref_forward_batches,
        "quantization": quant,
    }
    device = {
        "device": pick_device(),
        "dtype": dtype_name(cfg.dpo.precision),
        "quantization": quant,
    }
    return BuildResult(metrics=metrics, device=device, extra={"base_model": lineage})


reference_logps, dpo_ref_task = REF.define(ref_spec, build_ref)
dpo, dpo_task = STAGE.define(dpo_spec, build_dpo, train_stage)
