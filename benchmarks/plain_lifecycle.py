"""The plain script a user would write for the same lifecycle, without FastTrack.

    python benchmarks/plain_lifecycle.py PLAN.json OUT_DIR

data -> pretrain (stock `Trainer`) -> SFT (TRL `SFTTrainer` + peft LoRA, 4-bit via bitsandbytes
when the plan says so) -> DPO (TRL `DPOTrainer`, the reference = the policy with the adapter
disabled) -> RAG (sentence-transformers + faiss). No orchestration, no cache, no checkpoints.
PLAN.json holds every number (steps, batch sizes, optimizer, block size, model architecture,
LoRA, chunk size...), written by benchmarks/pipeline_vs_script.py from the run config, so both
sides do the same work; `stages` (optional) runs a prefix of the lifecycle and `threads` sets
torch's thread count. Each stage prints one line `STAGE {json}` (wall seconds, train seconds,
train CPU seconds of the process, tokens).
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

T0 = time.perf_counter()
import torch  # noqa: E402  (the imports are part of what the user waits for)
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>' + '\n' + message['content'] + '</s>' + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' + '\n' }}{%- endif -%}"
)


def report(stage: str, started: float, **extra) -> None:
    print("STAGE", json.dumps({"stage": stage, "seconds": round(time.perf_counter() - started, 2),
                               **extra}), flush=True)  # fmt: skip


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def split(rows: list, plan: dict) -> dict[str, list]:
    """Seeded shuffle, then validation / test fractions off the end."""
    rows = list(rows)
    random.Random(plan["seed"]).shuffle(rows)
    n_val, n_test = (int(len(rows) * plan["split"][k]) for k in ("validation", "test"))
    n_train = len(rows) - n_val - n_test
    return {
        "train": rows[:n_train],
        "validation": rows[n_train : n_train + n_val],
        "test": rows[n_train + n_val :],
    }


def clean(rows: list[dict], text) -> list[dict]:
    seen, out = set(), []
    for r in rows:
        t = text(r).strip()
        if len(t) >= 20 and t not in seen:
            seen.add(t)
            out.append(r)
    return out


def train_args(section: dict, out: Path, plan: dict, has_eval: bool) -> dict:
    return {
        "output_dir": str(out), "max_steps": section["max_steps"],
        "per_device_train_batch_size": section["per_device_batch_size"],
        "per_device_eval_batch_size": section["per_device_batch_size"],
        "learning_rate": section["learning_rate"], "lr_scheduler_type": section["lr_scheduler"],
        "warmup_steps": section["warmup_ratio"], "weight_decay": section["weight_decay"],
        "eval_strategy": "steps" if has_eval else "no", "eval_steps": section["eval_steps"],
        "logging_steps": section["logging_steps"], "save_strategy": "no", "use_cpu": True,
        "bf16": False, "report_to": "none", "disable_tqdm": True, "seed": plan["seed"],
        "gradient_checkpointing": False,
        "optim": section["optimizer"],  # the config's (transformers' default is the fused AdamW)
    }  # fmt: skip


def timed_train(trainer) -> tuple[object, float]:
    """trainer.train() and the process CPU seconds it took (all threads)."""
    start = time.process_time()
    result = trainer.train()
    return result, round(time.process_time() - start, 2)


def data_stage(plan: dict):
    t = time.perf_counter()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = plan["data"]
    corpus = clean([r for p in d["corpus"] for r in read_jsonl(p)], lambda r: r["text"])
    qa = clean(read_jsonl(d["sft"]), lambda r: r["instruction"] + r["output"])
    pref = clean(read_jsonl(d["preference"]), lambda r: r["prompt"] + r["chosen"] + r["rejected"])
    corpus_s, qa_s, pref_s = split(corpus, plan), split(qa, plan), split(pref, plan)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=plan["tokenizer"]["vocab_size"],
        min_frequency=plan["tokenizer"]["min_frequency"],
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([r["text"] for r in corpus_s["train"]], trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tok.chat_template = CHAT_TEMPLATE

    block = plan["pretrain"]["block_size"]

    def pack(rows: list[dict]) -> list[dict]:
        ids: list[int] = []
        for doc in tok([r["text"] for r in rows], add_special_tokens=False)["input_ids"]:
            ids += doc + [tok.eos_token_id]
        blocks = [ids[i : i + block] for i in range(0, len(ids) - block + 1, block)]
        return [{"input_ids": b, "attention_mask": [1] * block, "labels": b} for b in blocks]

    blocks = {"train": pack(corpus_s["train"]), "validation": pack(corpus_s["validation"])}
    report("data", t, train_blocks=len(blocks["train"]), docs=len(corpus))
    return tok, blocks, corpus_s, qa_s, pref_s


def pretrain_stage(plan: dict, tok, blocks: dict, out: Path) -> None:
    import datasets

    t = time.perf_counter()
    p, a = plan["pretrain"], plan["architecture"]
    torch.manual_seed(plan["seed"])
    config = LlamaConfig(
        vocab_size=len(tok), **a,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    train = datasets.Dataset.from_list(blocks["train"])
    val = datasets.Dataset.from_list(blocks["validation"][: p["eval_max_blocks"]])
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**train_args(p, out / "pretrain-work", plan, len(val) > 0)),
        train_dataset=train,
        eval_dataset=val if len(val) else None,
        data_collator=default_data_collator,
    )
    result, cpu = timed_train(trainer)
    final = trainer.evaluate() if len(val) else {}
    trainer.save_model(str(out / "pretrained"))
    tok.save_pretrained(out / "pretrained")
    tokens = p["max_steps"] * p["per_device_batch_size"] * p["block_size"]
    report("pretrain", t, train_seconds=result.metrics["train_runtime"], train_tokens=tokens,
           train_cpu_seconds=cpu, eval_loss=final.get("eval_loss"))  # fmt: skip


def load_base(plan: dict, path: Path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = plan["quantization"]
    if not q["load_in_4bit"]:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q["quant_type"],
        bnb_4bit_use_double_quant=q["double_quant"],
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=bnb, device_map={"": "cpu"}
    )
    import bitsandbytes as bnb_lib
    from peft import prepare_model_for_kbit_training

    for m in model.modules():  # bitsandbytes' CPU bf16 repack breaks gradients after eval
        if isinstance(m, bnb_lib.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def conversation(r: dict) -> dict:
    return {
        "prompt": [{"role": "user", "content": r["instruction"]}],
        "completion": [{"role": "assistant", "content": r["output"]}],
    }


def sft_stage(plan: dict, tok, qa: dict, out: Path) -> None:
    import datasets
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    t = time.perf_counter()
    s = plan["sft"]
    model = load_base(plan, out / "pretrained")
    train = datasets.Dataset.from_list([conversation(r) for r in qa["train"]])
    val_rows = [conversation(r) for r in qa["validation"][: s["eval_max_rows"]]]
    val = datasets.Dataset.from_list(val_rows) if val_rows else None
    args = SFTConfig(
        **train_args(s, out / "sft-work", plan, val is not None),
        max_length=s["max_length"], packing=s["packing"], eval_on_start=val is not None,
        completion_only_loss=s["completion_only_loss"], dataset_num_proc=1,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=val, processing_class=tok,
        peft_config=LoraConfig(task_type="CAUSAL_LM", **plan["lora"]),
    )  # fmt: skip
    result, cpu = timed_train(trainer)
    if val is not None:
        trainer.evaluate()
    trainer.save_model(str(out / "sft"))
    tokens = max((h.get("num_tokens", 0) for h in trainer.state.log_history), default=0)
    report("sft", t, train_seconds=result.metrics["train_runtime"], train_tokens=tokens,
           train_cpu_seconds=cpu,
           train_samples=s["max_steps"] * s["per_device_batch_size"])  # fmt: skip


def dpo_stage(plan: dict, tok, pref: dict, out: Path) -> None:
    import datasets
    from peft import PeftModel
    from trl import DPOConfig, DPOTrainer

    t = time.perf_counter()
    d = plan["dpo"]
    model = PeftModel.from_pretrained(load_base(plan, out / "pretrained"), out / "sft",
                                      is_trainable=True)  # fmt: skip

    def conv(rows: list[dict]) -> list[dict]:
        return [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in rows
        ]

    val_rows = conv(pref["validation"][: d["eval_max_rows"]])
    val = datasets.Dataset.from_list(val_rows) if val_rows else None
    args = DPOConfig(
        **train_args(d, out / "dpo-work", plan, val is not None),
        beta=d["beta"], loss_type=d["loss_type"], max_length=d["max_length"], dataset_num_proc=1,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(conv(pref["train"])),
        eval_dataset=val, processing_class=tok,
    )  # fmt: skip
    result, cpu = timed_train(trainer)
    final = trainer.evaluate() if val is not None else {}
    trainer.save_model(str(out / "dpo"))
    report("dpo", t, train_seconds=result.metrics["train_runtime"], train_cpu_seconds=cpu,
           train_samples=d["max_steps"] * d["per_device_batch_size"],
           reward_accuracy=final.get("eval_rewards/accuracies"))  # fmt: skip


def rag_stage(plan: dict, corpus: dict, out: Path) -> None:
    import faiss
    from sentence_transformers import SentenceTransformer

    t = time.perf_counter()
    r = plan["rag"]
    model = SentenceTransformer(r["embedder_path"], device="cpu")
    size, stride = r["size_tokens"], r["size_tokens"] - r["overlap_tokens"]
    passages = []
    for doc in (d for name in ("train", "validation", "test") for d in corpus[name]):
        enc = model.tokenizer(doc["text"], add_special_tokens=False,
                              return_offsets_mapping=True, verbose=False)  # fmt: skip
        spans = enc["offset_mapping"]
        for i in range(0, max(len(spans) - r["overlap_tokens"], 1), stride):
            window = spans[i : i + size]
            if not window:
                break
            text = doc["text"][window[0][0] : window[-1][1]]
            title = doc.get("title") or ""
            passages.append(f"{title}\n\n{text}" if title and not text.startswith(title) else text)
    vectors = model.encode(passages, batch_size=r["batch_size"], normalize_embeddings=True,
                           convert_to_numpy=True)  # fmt: skip
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    faiss.write_index(index, str(out / "index.faiss"))
    report("rag", t, chunks=len(passages))


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(plan.get("threads") or torch.get_num_threads())
    report("imports", T0)
    stages = set(plan.get("stages") or ("data", "pretrain", "sft", "dpo", "rag"))
    tok, blocks, corpus, qa, pref = data_stage(plan)
    if "pretrain" in stages:
        pretrain_stage(plan, tok, blocks, out)
    if "sft" in stages:
        sft_stage(plan, tok, qa, out)
    if "dpo" in stages:
        dpo_stage(plan, tok, pref, out)
    if "rag" in stages:
        rag_stage(plan, corpus, out)
    report("total", T0)


if __name__ == "__main__":
    main()
