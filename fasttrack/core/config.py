"""Run configuration: one pydantic section per stage, loaded from YAML with `--set` overrides.

Why strict: a typo in a key silently falling back to a default wastes a GPU-day, so unknown keys
are errors, and every error names the file, the line when known, and the field path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from fasttrack.core.compute import ComputeConfig
from fasttrack.core.config_base import Section, deprecated
from fasttrack.core.config_eval import (
    EvaluateConfig,
    ExportConfig,
    GenerationConfig,
    RagConfig,
    RagContextConfig,
)
from fasttrack.core.config_track import SweepConfig, TrackingConfig
from fasttrack.core.store_remote import check_url

ROOT = Path(__file__).resolve().parents[2]  # the project checkout (editable install)
DEFAULT_CONFIG = ROOT / "pipeline_configs" / "tiny-cpu.yaml"
STAGES = ("data", "pretrain", "sft", "dpo", "rag", "evaluate")
Format = Literal["text", "alpaca", "sharegpt", "messages", "prompt_completion", "preference"]
# Canonical fields of each format: name -> required. `columns` maps these to a source's columns.
FORMAT_FIELDS: dict[str, dict[str, bool]] = {
    "text": {"text": True, "title": False},
    "alpaca": {"instruction": True, "input": False, "output": True, "system": False},
    "sharegpt": {"conversations": True},
    "messages": {"messages": True},
    "prompt_completion": {"prompt": True, "completion": True},
    "preference": {"prompt": True, "chosen": True, "rejected": True},
}
META_FIELDS = ("source", "id")  # optional pass-through columns of every format


class SourceConfig(Section):
    path: str = Field(description="File, folder, `hf://owner/name[:split]` or `demo:<name>`.")
    format: Format
    columns: dict[str, str] = Field(
        default_factory=dict, description="Canonical field -> column name in this source."
    )
    subset: str | None = Field(None, description="Dataset config name for hf:// sources.")
    max_rows: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _known_columns(self) -> SourceConfig:
        fields = [*FORMAT_FIELDS[self.format], *META_FIELDS]
        for name in self.columns:
            if name not in fields:
                raise ValueError(
                    f"columns.{name}: not a field of format {self.format} "
                    f"(fields: {', '.join(fields)})"
                )
        return self


class CleanConfig(Section):
    unicode_form: Literal["NFC", "NFKC", "none"] = "NFKC"
    collapse_whitespace: bool = True
    min_chars: int = Field(1, ge=0)
    max_chars: int | None = Field(None, gt=0)
    exact_dedup: bool = True
    near_dedup: bool = True
    near_dedup_threshold: float = Field(0.85, gt=0, le=1)
    num_perm: int = Field(128, ge=16, le=1024)
    shingle_size: int = Field(5, ge=1)


class SplitConfig(Section):
    validation: float = Field(0.05, ge=0, lt=0.5)
    test: float = Field(0.05, ge=0, lt=0.5)
    seed: int = 42


class DataConfig(Section):
    sources: list[SourceConfig] = Field(min_length=1)
    clean: CleanConfig = CleanConfig()
    split: SplitConfig = SplitConfig()
    encoding: str = "utf-8"
    max_record_chars: int | None = Field(
        1_000_000,
        gt=0,
        description="A longer record (JSONL line, CSV row, text file) is an error, not a silent "
        "multi-GB cleaning job; null = no limit. Not part of the key.",
    )
    workers: int | None = Field(
        None,
        ge=1,
        description="Processes for the per-row cleaning work; null = one per core for inputs "
        "over 16 MB, else 1. Results do not depend on it; not part of the key.",
    )
    engine: Literal["local", "dask"] = Field(
        "local",
        description="Where the per-row work runs: local processes, or Dask workers "
        "(compute.dask_address, else a LocalCluster of `workers` processes). Not in the key.",
    )


class TokenizerConfig(Section):
    """Byte-level BPE trained on the corpus when the base model is `scratch`."""

    vocab_size: int = Field(4096, ge=300, le=262144)
    min_frequency: int = Field(2, ge=1)


class ArchitectureConfig(Section):
    """A Llama-architecture model built from scratch (ignored for hub/local base models)."""

    hidden_size: int = Field(128, gt=0)
    intermediate_size: int = Field(256, gt=0)
    num_hidden_layers: int = Field(2, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int = Field(2, gt=0)
    max_position_embeddings: int = Field(512, gt=1)
    tie_word_embeddings: bool = True
    rope_theta: float = Field(10000.0, gt=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> ArchitectureConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return self


class ModelConfig(Section):
    name_or_path: str = Field(
        "scratch", description="`scratch`, a hub id (`owner/name`) or a local model directory."
    )
    revision: str | None = None
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with a hub model (only for repos you trust)."
    )
    allow_pickle: bool = Field(
        False,
        description="Also load pickle checkpoints (pytorch_model.bin), which can run code on "
        "load; default: safetensors only.",
    )
    chat_template: str | None = Field(
        None,
        description="Chat template: chatml, llama3, gemma, phi3, mistral, alpaca, a Jinja string "
        "or a .jinja file; unset: the model's own, else ChatML ending turns with its EOS.",
    )
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="dtype of the models pretrain and the SFT merge write; auto: the base's.",
    )
    resize_embeddings: bool = Field(
        False,
        description="Grow the embedding matrix to the tokenizer's size when the tokenizer is "
        "larger (default: that is an error, found before any stage runs).",
    )
    tokenizer: TokenizerConfig = TokenizerConfig()
    architecture: ArchitectureConfig = ArchitectureConfig()

    @field_validator("chat_template")
    @classmethod
    def _template_resolves(cls, value: str | None, info: ValidationInfo) -> str | None:
        """A relative `.jinja` path resolves against the config file's folder (the loader's
        context), and is kept absolute so every later reader finds the same file."""
        from fasttrack.core.templates import resolve, template_file

        base = (info.context or {}).get("config_dir")
        resolve(value, base)  # a ValueError names the field
        path = template_file(value, base)
        return str(path.resolve()) if path is not None else value


class TrainingConfig(Section):
    """Knobs every training stage shares (pretrain, SFT, DPO): one definition, one Trainer."""

    max_steps: int = Field(300, gt=0)
    per_device_batch_size: int = Field(8, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    learning_rate: float = Field(3e-3, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup", "constant"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_checkpointing: bool = False
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit"] = "adamw_torch"
    logging_steps: int = Field(10, gt=0)
    eval_steps: int = Field(50, gt=0)
    save_steps: int = Field(50, gt=0)
    save_total_limit: int = Field(2, gt=0)
    timeout_minutes: float | None = Field(
        None, gt=0, description="Stop the stage after this long (checkpoints are kept)."
    )
    nan_policy: Literal["abort", "skip"] = Field(
        "abort",
        description="A non-finite loss or gradient: abort the stage (nothing published), or "
        "skip that optimizer step (no weight update) up to max_skipped_steps times.",
    )
    max_skipped_steps: int = Field(10, ge=1, description="nan_policy skip: abort after this many.")


class PretrainConfig(TrainingConfig):
    block_size: int = Field(256, ge=8)
    eval_max_blocks: int | None = Field(64, gt=0, description="Cap on validation blocks.")


class LoraConfig(Section):
    r: int = Field(8, gt=0)
    lora_alpha: int = Field(16, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] = []
    use_rslora: bool = False
    use_dora: bool = False


class QuantizationConfig(Section):
    """QLoRA: 4-bit base weights via bitsandbytes (CPU and CUDA); LoRA when 4-bit cannot run."""

    load_in_4bit: bool = True
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"


class AdapterConfig(Section):
    """The LoRA adapter SFT trains and DPO continues: one definition that both stages read."""

    lora: LoraConfig = LoraConfig()
    quantization: QuantizationConfig = QuantizationConfig()


class SftConfig(TrainingConfig):
    enabled: bool = True
    lora: LoraConfig | None = Field(None, description="Deprecated: use adapter.lora.")
    quantization: QuantizationConfig | None = Field(
        None, description="Deprecated: use adapter.quantization."
    )
    max_length: int = Field(256, ge=8)
    completion_only_loss: bool = Field(True, description="Loss on the answers only.")
    packing: bool = Field(False, description="BFD packing, no cross-sample attention.")
    merge: bool = Field(True, description="Also publish the merged model.")
    eval_max_rows: int | None = Field(64, gt=0)
    rag_context: RagContextConfig | None = Field(
        None, description="RAFT: train on prompts carrying retrieved chunks (README, RAFT)."
    )


class DpoConfig(TrainingConfig):
    enabled: bool = True
    beta: float = Field(0.1, gt=0)
    loss_type: list[str] = Field(["sigmoid"], min_length=1)
    max_length: int = Field(256, ge=8)
    eval_max_rows: int | None = Field(64, gt=0)


class StoreConfig(Section):
    """Where artifacts live (a plain string is shorthand for `url`); see store_remote.py."""

    url: str = Field("artifacts", description="Local path or fsspec URL (s3://bucket/prefix).")
    credentials_block: str | None = Field(
        None,
        pattern=r"^[a-z0-9-]+/[A-Za-z0-9_.-]+$",
        description="Prefect block `aws-credentials/NAME`, `minio-credentials/NAME` or "
        "`secret/NAME` (JSON fsspec options); unset: the environment (AWS_ACCESS_KEY_ID...).",
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"url": value} if isinstance(value, str) else value

    @field_validator("url")
    @classmethod
    def _backend_installed(cls, url: str) -> str:
        return check_url(url)

    def __str__(self) -> str:
        return self.url


class RunConfig(Section):
    name: str = "run"
    seed: int = 42
    store: StoreConfig = StoreConfig()
    hf_token_secret: str | None = Field(
        None,
        description="Name of a Prefect Secret block holding the Hugging Face token (default: "
        "the HF_TOKEN environment variable). The token itself never goes into a config.",
    )
    model: ModelConfig = ModelConfig()
    data: DataConfig
    pretrain: PretrainConfig = PretrainConfig()
    adapter: AdapterConfig = AdapterConfig()
    sft: SftConfig = SftConfig()
    dpo: DpoConfig = DpoConfig()
    rag: RagConfig = RagConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    generation: GenerationConfig = GenerationConfig()
    compute: ComputeConfig = ComputeConfig()
    export: ExportConfig = ExportConfig()
    tracking: TrackingConfig = TrackingConfig()  # in no stage key (config_track.py)
    sweep: SweepConfig = SweepConfig()
    _source: str | None = PrivateAttr(None)  # the config file, for `file:line` in errors

    @model_validator(mode="after")
    def _adapter_from_sft(self) -> RunConfig:
        """`sft.lora` / `sft.quantization` (the old place) still work, moved to `adapter`."""
        for name in ("lora", "quantization"):
            old = getattr(self.sft, name)
            if old is None:
                continue
            if name in self.adapter.model_fields_set:
                raise ValueError(f"set adapter.{name} or sft.{name} (deprecated), not both")
            # Sections are frozen; this runs once, during validation, before anyone reads them.
            object.__setattr__(self, "adapter", self.adapter.model_copy(update={name: old}))
            object.__setattr__(self, "sft", self.sft.model_copy(update={name: None}))
            deprecated(f"sft.{name} is deprecated: move it to adapter.{name} (same fields)")
        return self

    @model_validator(mode="after")
    def _fits_scratch_model(self) -> RunConfig:
        if self.model.name_or_path != "scratch":
            return self  # checked against the real model's config when it is loaded
        limit = self.model.architecture.max_position_embeddings
        if self.pretrain.block_size > limit:
            raise ValueError(
                f"pretrain.block_size ({self.pretrain.block_size}) is larger than "
                f"model.architecture.max_position_embeddings ({limit})"
            )
        if self.evaluate.perplexity.max_length > limit:
            raise ValueError(
                f"evaluate.perplexity.max_length ({self.evaluate.perplexity.max_length}) is "
                f"larger than model.architecture.max_position_embeddings ({limit})"
            )
        return self
