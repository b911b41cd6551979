"""QLoRA instruction tuning with TRL's SFTTrainer on the pretrained (or base) model.

Rows become conversational prompt/completion pairs (everything before the last assistant turn
is the prompt), so the loss is on the answers only by default and the chat template (which ends
each turn with EOS) puts a trained EOS after every answer. Output: the adapter (stock
`PeftModel.from_pretrained(base, dir)`), the tokenizer, and optionally `merged/`, a plain
model for stock `AutoModelForCausalLM` / `pipeline("text-generation")`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fasttrack.core.config import RunConfig
from fasttrack.core.stage import BuildResult, Stage, StageSpec
from fasttrack.core.store import ArtifactRef, ArtifactStore
from fasttrack.lib.adapters import (
    base_lineage,
    load_for_training,
    lora_config,
    trainable_snapshot,
    unchanged_tensors,
)
from fasttrack.lib.datasets import read_split
from fasttrack.lib.documents import documents_hash, load_documents
from fasttrack.lib.embedder import resolve_embedder
from fasttrack.lib.models import load_model, pick_device, target_dtype
from fasttrack.lib.training import (
    dtype_name,
    run_trainer,
    train_stage,
    trainer_kwargs,
    training_key_config,
)

STAGE = Stage("sft", "1", retries=1, retry_delay_seconds=5)


def sft_spec(cfg: RunConfig, model: ArtifactRef, data: ArtifactRef) -> StageSpec:
    config = training_key_config(cfg.sft, cfg.seed)  # + the adapter: one key, wherever it's set
    config |= cfg.adapter.model_dump(mode="json")
    if cfg.model.dtype != "auto":  # the merged model's dtype; auto keeps the old keys
        config["dtype"] = cfg.model.dtype
    inputs = {}
    if (rc := cfg.sft.rag_context) is not None:  # RAFT: the contexts' documents and chunking
        config["rag_context"] = rc.model_dump(mode="json") | {
            "chunk": cfg.rag.chunk.model_dump(mode="json")
        }
        inputs["chunk_tokenizer"] = resolve_embedder(cfg.rag.embedder)[1]
        if cfg.rag.documents:
            inputs["documents"] = documents_hash(Path(cfg.rag.documents).expanduser())
    return STAGE.spec(config, upstream={"model": model, "data": data}, inputs=inputs)


def prompt_completion(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Conversational prompt/completion: the last assistant turn is the completion."""
    out = []
    for row in rows:
        messages = row["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        out.append({"prompt": messages[:last], "completion": [messages[last]]})
    return out


def sft_trainer(
    cfg: RunConfig, model: Any, tok: Any, train: Any, val: Any, work: Path, **overrides: Any
) -> Any:
    """TRL SFTTrainer with the config's knobs and LoRA (the one place SFT is set up; the
    packing benchmark and the EOS test use it too). `overrides` replace SFTConfig fields."""
    from trl import SFTConfig, SFTTrainer

    s = cfg.sft
    kwargs = trainer_kwargs(s, work, cfg.seed, has_eval=val is not None)
    kwargs |= {
        "max_length": s.max_length,
        "completion_only_loss": s.completion_only_loss,
        "packing": s.packing,
        "dataset_num_proc": 1,
    }
    return SFTTrainer(
        model=model,
        args=SFTConfig(**(kwargs | overrides)),
        train_dataset=train,
        eval_dataset=val,
        processing_class=tok,
        peft_config=lora_config(cfg.adapter.lora, model),
    )


def build_sft(cfg: RunConfig, spec: StageSpec, out: Path) -> BuildResult:
    import datasets

    s, store = cfg.sft, ArtifactStore(cfg.store)
    data = spec.upstream["data"]
    model, tok, quant = load_for_training(cfg, spec.upstream["model"])
    with_context = raft_contexts(cfg, store, data, tok)
    train_rows = with_context(read_split(store, data, "sft", "train"))
    train = datasets.Dataset.from_list(prompt_completion(train_rows))
    val_rows = with_context(read_split(store, data, "sft", "validation")[: s.eval_max_rows])
    val = datasets.Dataset.from_list(prompt_completion(val_rows)) if val_rows else None
    work = store.work_dir("sft", spec.key)
    trainer = sft_trainer(cfg, model, tok, train, val, work)
    before = trainable_snapshot(trainer.model)
    metrics = run_trainer(
        trainer, "sft", work, out, eval_before=True, section=cfg.sft,
        after=lambda m: {"trainable_tensors_unchanged": len(unchanged_tensors(m, before))},
    )  # fmt: skip
    tok.save_pretrained(out)
    lineage = base_lineage(cfg, spec.upstream["model"], out)
    metrics |= {
        "trainable_params": sum(t.numel() for t in before.values()),
        "trainable_tensors": len(before),
        "quantization": quant,
    }
    if s.merge:
        merge_adapter(cfg, spec.upstream["model"], out, out / "merged")
    device = {"device": pick_device(), "dtype": dtype_name(s.precision), "quantization": quant}
    return BuildResult(metrics=metrics, device=device, extra={"base_model": lineage})


def raft_contexts(
    cfg: RunConfig, store: ArtifactStore, data: ArtifactRef, tok: Any
) -> Callable[[list[dict[str, Any]]], list[dict[str, Any]]]:
    """Rows -> rows whose prompts carry RAFT contexts (`sft.rag_context`); as-is when unset."""
    rc = cfg.sft.rag_context
    if rc is None:
        return lambda rows: rows
    from transformers import AutoTokenizer

    from fasttrack.lib.raft import ContextIndex, raft_rows

    docs, _ = load_documents(cfg, store, data)
    chunk_tok = AutoTokenizer.from_pretrained(str(resolve_embedder(cfg.rag.embedder)[0]))
    index = ContextIndex.build(docs, chunk_tok, cfg.rag.chunk)
    return lambda rows: raft_rows(rows, index, rc, cfg.seed, tok, cfg.sft.max_length)


def merge_adapter(cfg: RunConfig, model_ref: ArtifactRef, adapter: Path, dest: Path) -> None:
    """Merge the adapter into full-precision base weights: a plain model, no peft needed,
    written in the base's dtype (or `model.dtype`)."""
    import torch
    from peft import PeftModel

    base, tok = load_model(cfg, model_ref, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.to(target_dtype(cfg, model_ref)).save_pretrained(dest)
    tok.save_pretrained(dest)


sft, sft_task = STAGE.define(sft_spec, build_sft, train_stage)
