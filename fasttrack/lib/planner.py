"""Preflight planner: parameters, memory, tokens and FLOPs of each training stage, from the model
config alone (meta device: no weights, no GPU), so "does it fit on my 24 GiB card?" is answered
in a second, before a multi-GB download or an out-of-memory crash an hour into a run.

Bytes per parameter (mixed-precision AdamW; Rajbhandari et al. 2020, ZeRO, sec. 3.1):
  full fine-tune  2 (bf16/fp16 weights) + 2 (grads) + 4 (fp32 master) + 8 (Adam m, v) = 16;
                  precision fp32 (e.g. CPU): 4 + 4 + 8 = 16 as well. 8-bit Adam (bitsandbytes,
                  Dettmers et al. 2021): m, v take 2 bytes, so 10 bytes/param either way.
  LoRA            frozen base weights 2 (bf16) or 4 (fp32) bytes/param; the adapter's trainable
                  params (Hu et al. 2021) cost 16 bytes/param as above.
  QLoRA           Linear weights except lm_head in nf4/fp4 (Dettmers et al. 2023): 0.5 bytes/param
                  + one fp32 absmax per block of 64 (4/64 = 0.0625); double quant: 8-bit absmax
                  (1/64) + one fp32 constant per 256 blocks (4/(64*256)). Embeddings, norms and
                  lm_head stay 16-bit (fp32 when quantization.compute_dtype is fp32).
Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation", eq. 2): per layer
  s*b*h*(34 + 5*a*s/h) bytes (16-bit, no recompute; x2 in fp32); with gradient checkpointing
  2*s*b*h per layer (the saved layer inputs) + one layer's full activations; plus the logits
  s*b*V*4 (fp32 loss). s seq len, b micro-batch (x2 for DPO: chosen + rejected), h hidden,
  a heads, V vocab. An estimate: SDPA/flash attention do not store the a*s^2 scores.
FLOPs (Kaplan et al. 2020: 6*N*D): forward 2*N*D, backward activation grads 2*N*D (they flow
  through frozen weights too), weight grads 2*N_t*D -> (4*N + 2*N_t)*D with N = all params in
  the trained model (base + adapter), N_t = trainable: 6*N*D for a full fine-tune, ~(4*N_base +
  6*N_t)*D for LoRA. Gradient checkpointing adds one forward (2*N*D). N includes embeddings and
  the attention s^2 term is ignored. DPO's reference log-probs are computed once per pair by the
  dpo_ref step (not per step), so they are not counted.
Verdict: fits when the total is at most 90% of the device memory (CUDA context, allocator
  fragmentation, temporary buffers); precision "auto" is planned as bf16/fp16 (a GPU's).
  Otherwise it names the knobs, cheapest first, that make the stage fit.
Tokens per parameter are compared with Chinchilla's compute-optimal ~20 (Hoffmann et al. 2022):
  meaningful for pretraining, context only for fine-tuning.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from fasttrack.core.config import LoraConfig, RunConfig, TrainingConfig
from fasttrack.core.errors import ModelError
from fasttrack.lib.device_info import parse_size  # noqa: F401 (re-exported)
from fasttrack.lib.model_files import matches_target, model_config

if TYPE_CHECKING:
    from rich.table import Table

CHINCHILLA_TOKENS_PER_PARAM = 20.0
HEADROOM = 0.9  # usable share of device memory: CUDA context, fragmentation, temporary buffers
GiB = 2**30


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs from a model: exact counts and Linear shapes, no weights."""

    total_params: int  # shared (tied) tensors counted once
    linears: dict[str, tuple[int, int, int]]  # module name -> (in, out, bias numel)
    module_params: dict[str, int]  # module name -> its parameter count (for modules_to_save)
    output_name: str | None  # the output layer (lm_head), never quantized nor "all-linear"
    hidden: int
    layers: int
    heads: int
    vocab: int


def model_shape(config: Any, trust_remote_code: bool = False) -> ModelShape:
    """Instantiate the model on the meta device (no memory) and read its exact structure."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as exc:  # e.g. an encoder-only config: no causal-LM class
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"model.name_or_path: not a causal LM config: {first}") from None
    linears: dict[str, tuple[int, int, int]] = {}
    for name, mod in model.named_modules():
        bias = mod.bias.numel() if getattr(mod, "bias", None) is not None else 0
        if isinstance(mod, torch.nn.Linear):
            linears[name] = (mod.in_features, mod.out_features, bias)
        elif isinstance(mod, Conv1D):  # GPT-2 style: weight is (in, out)
            linears[name] = (mod.weight.shape[0], mod.weight.shape[1], bias)
    out = model.get_output_embeddings()
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelShape(
        total_params=sum(p.numel() for p in model.parameters()),
        linears=linears,
        module_params={n: sum(p.numel() for p in m.parameters()) for n, m in model.named_modules()},
        output_name=next((n for n, m in model.named_modules() if m is out), None),
        hidden=text.hidden_size,
        layers=text.num_hidden_layers,
        heads=text.num_attention_heads,
        vocab=text.vocab_size,
    )


def lora_params(shape: ModelShape, lora: LoraConfig) -> tuple[int, int]:
    """(params LoRA adds, base params it makes trainable) as peft counts them.

    Targets match module names like peft: equal to, or ending in "." + target; "all-linear" is
    every Linear except the output layer. Adds r*(in+out) per target (+ out for DoRA's magnitude)
    and a trainable copy of each modules_to_save module."""
    if lora.target_modules == "all-linear":
        targets = [n for n in shape.linears if n != shape.output_name]
    else:
        wanted = lora.target_modules
        targets = [n for n in shape.linears if any(matches_target(n, t) for t in wanted)]
        if not targets:
            names = sorted({n.rsplit(".", 1)[-1] for n in shape.linears})
            raise ModelError(
                f"adapter.lora.target_modules: {', '.join(wanted)} name no Linear module of the "
                f"model; its Linear modules are: {', '.join(names)}"
            )
    shapes = [shape.linears[n] for n in targets]
    added = sum(lora.r * (i + o) + (o if lora.use_dora else 0) for i, o, _ in shapes)
    saved = [
        n for n in shape.module_params if n and any(n.endswith(t) for t in lora.modules_to_save)
    ]
    saved = [n for n in saved if not any(n.startswith(p + ".") for p in saved)]  # outermost only
    added += sum(shape.module_params[n] for n in saved)
    biases = {"none": [], "all": list(shape.linears), "lora_only": targets}[lora.bias]
    return added, sum(shape.linears[n][2] for n in biases)


@dataclass(frozen=True)
class StagePlan:
    """One training stage's budget; the CLI renders a list of these with `render_plan`."""

    stage: str
    method: str  # "full", "lora" or "qlora"
    total_params: int
    trainable_params: int
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    total_bytes: int
    seq_len: int
    micro_batch: int  # sequences per forward (DPO: 2 x pairs)
    tokens: int  # D = steps x micro-batch x accumulation x seq len (x2 for DPO)
    flops: float
    tokens_per_param: float
    chinchilla_ratio: float  # tokens per param / 20
    fits: bool | None  # None when no device memory was given
    verdict: str


@dataclass(frozen=True)
class _Setup:
    """The knobs one stage's memory depends on (varied to find what makes it fit)."""

    method: str
    batch: int
    grad_accum: int
    checkpointing: bool
    precision: str
    optimizer: str


def _memory(shape: ModelShape, cfg: RunConfig, s: _Setup, lora: tuple[int, int], seq: int,
            per_item: int) -> tuple[int, int, int, int, int]:  # fmt: skip
    """(weights, grads, optimizer states, activations) in bytes, and the trainable params.

    `lora` = (params the adapter adds, base params it makes trainable); `per_item` = sequences
    per batch item (2 for DPO)."""
    half = s.precision != "fp32"  # "auto" plans for bf16/fp16 on the target GPU
    wb = 2 if half else 4
    added = 0 if s.method == "full" else lora[0]
    trainable = shape.total_params if s.method == "full" else lora[0] + lora[1]
    base = shape.total_params * wb
    if s.method == "qlora":
        q = cfg.adapter.quantization
        quant = [i * o for n, (i, o, _) in shape.linears.items() if n != shape.output_name]
        base = (shape.total_params - sum(quant)) * (4 if q.compute_dtype == "fp32" else 2)
        base += sum(_quant_bytes(n, q.double_quant) for n in quant)
    master = 4 if half else 0  # fp32 master copy of 16-bit trainable weights
    adam = 2 if s.optimizer.endswith("8bit") else 8
    b, h, scale = s.batch * per_item, shape.hidden, 1 if half else 2
    layer = seq * b * h * (34 + 5 * shape.heads * seq / h) * scale
    acts = (
        shape.layers * (2 * seq * b * h * scale) + layer
        if s.checkpointing
        else shape.layers * layer
    )
    acts += seq * b * shape.vocab * 4  # fp32 logits for the loss
    return base + added * wb, trainable * wb, trainable * (master + adam), int(acts), trainable


def _quant_bytes(n: int, double_quant: bool) -> int:
    """bitsandbytes 4-bit storage of an n-element weight: packed nibbles + absmax constants."""
    blocks = math.ceil(n / 64)
    consts = blocks + 4 * math.ceil(blocks / 256) if double_quant else 4 * blocks
    return math.ceil(n / 2) + consts


def plan(cfg: RunConfig, gpu_mem_bytes: int | None = None) -> list[StagePlan]:
    """Plans of the enabled training stages (pretrain always; sft, dpo when enabled), for
    `fasttrack plan CONFIG --gpu-mem 24GiB`.

    Reads config.json only. Raises ModelError when it cannot be loaded or when
    adapter.lora.target_modules names no Linear module. sft and dpo train the same adapter
    (dpo continues the sft one; its reference log-probs come from the dpo_ref step, computed
    once with the SFT policy: no second model in memory)."""
    shape = model_shape(model_config(cfg), cfg.model.trust_remote_code)
    lora = lora_params(shape, cfg.adapter.lora)
    adapter = "qlora" if cfg.adapter.quantization.load_in_4bit else "lora"
    stages: list[tuple[str, str, TrainingConfig, int, int]] = [
        ("pretrain", "full", cfg.pretrain, cfg.pretrain.block_size, 1)
    ]
    if cfg.sft.enabled:
        stages.append(("sft", adapter, cfg.sft, cfg.sft.max_length, 1))
    if cfg.dpo.enabled:
        stages.append(("dpo", adapter, cfg.dpo, cfg.dpo.max_length, 2))
    plans = []
    for stage, method, t, seq, per_item in stages:
        setup = _Setup(method, t.per_device_batch_size, t.gradient_accumulation_steps,
                       t.gradient_checkpointing, t.precision, t.optimizer)  # fmt: skip
        mem = functools.partial(_memory, shape, cfg, lora=lora, seq=seq, per_item=per_item)
        weights, grads, optim, acts, trainable = mem(setup)
        total = weights + grads + optim + acts
        n = shape.total_params + (0 if method == "full" else lora[0])
        tokens = t.max_steps * t.per_device_batch_size * t.gradient_accumulation_steps
        tokens *= seq * per_item
        flops = (4 * n + 2 * trainable + (2 * n if t.gradient_checkpointing else 0)) * tokens
        per_param = tokens / shape.total_params
        plans.append(
            StagePlan(
                stage=stage,
                method=method,
                total_params=n,
                trainable_params=trainable,
                weights_bytes=weights,
                grads_bytes=grads,
                optimizer_bytes=optim,
                activation_bytes=acts,
                total_bytes=total,
                seq_len=seq,
                micro_batch=t.per_device_batch_size * per_item,
                tokens=tokens,
                flops=float(flops),
                tokens_per_param=per_param,
                chinchilla_ratio=per_param / CHINCHILLA_TOKENS_PER_PARAM,
                fits=None if gpu_mem_bytes is None else total <= gpu_mem_bytes * HEADROOM,
                verdict=_verdict(stage, setup, total, gpu_mem_bytes, mem),
            )
        )
    return plans


def _verdict(stage: str, s: _Setup, total: int, gpu: int | None, mem: Any) -> str:
    """'fits', or the shortest cumulative list of knobs (cheapest first) that makes it fit."""
    if gpu is None:
        return "-"
    usable = gpu * HEADROOM
    if total <= usable:
        return f"fits ({_gib(total)}, {total / gpu:.0%} of the device)"
    steps: list[tuple[str, _Setup]] = []
    if s.batch > 1:
        s = replace(s, batch=1, grad_accum=s.batch * s.grad_accum)
        text = f"{stage}.per_device_batch_size=1 + gradient_accumulation_steps={s.grad_accum}"
        steps.append((text, s))
    if not s.checkpointing:
        s = replace(s, checkpointing=True)
        steps.append((f"{stage}.gradient_checkpointing=true", s))
    if s.method == "full" and not s.optimizer.endswith("8bit"):
        s = replace(s, optimizer="adamw_8bit")
        steps.append((f"{stage}.optimizer=adamw_8bit", s))
    if s.method != "qlora":
        s = replace(s, method="qlora")
        qlora = "QLoRA (adapter.quantization.load_in_4bit=true)"
        if stage == "pretrain":
            qlora = "no full fine-tune: skip pretrain and adapt with sft + " + qlora
        steps.append((qlora, s))
    knobs = [text for text, _ in steps]
    for i, (_, setup) in enumerate(steps):
        if sum(mem(setup)[:4]) <= usable:
            return f"does not fit ({_gib(total)}); fits with: {'; '.join(knobs[: i + 1])}"
    tried = f" even with: {'; '.join(knobs)}" if knobs else ""
    advice = "needs a bigger device, shorter sequences or a smaller model"
    return f"does not fit ({_gib(total)}){tried}: {advice}"


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,.0f}"


def render_plan(plans: list[StagePlan], gpu_mem_bytes: int | None = None) -> Table:
    """A rich Table of the plans: sizes in GiB, FLOPs like 1.2e15, and the verdict."""
    from rich.table import Table

    device = f" for {_gib(gpu_mem_bytes)} of device memory" if gpu_mem_bytes else ""
    table = Table(title=f"Training plan{device}")
    columns = "stage method params trainable weights grads optimizer activations total tokens"
    for col in [*columns.split(), "FLOPs", "tokens/param", "verdict"]:
        table.add_column(col, justify="left" if col in ("stage", "method", "verdict") else "right")
    for p in plans:
        style = None if p.fits is None else "green" if p.fits else "red"
        table.add_row(
            p.stage, p.method, _count(p.total_params), _count(p.trainable_params),
            _gib(p.weights_bytes), _gib(p.grads_bytes), _gib(p.optimizer_bytes),
            _gib(p.activation_bytes), _gib(p.total_bytes), _count(p.tokens),
            f"{p.flops:.1e}".replace("e+", "e"),
            f"{p.tokens_per_param:.3g} ({p.chinchilla_ratio:.2g}x Chinchilla)", p.verdict,
            style=style,
        )  # fmt: skip
    return table
