"""Model loading for adapter training (SFT, DPO): QLoRA 4-bit via bitsandbytes, LoRA otherwise.

Why here: SFT and DPO must load the base identically (same quantization, same CPU workaround),
or DPO's reference log-probs would not match the SFT policy they describe. 4-bit is used
wherever bitsandbytes can run it (CUDA and CPU); where it cannot, plain LoRA is used, a warning
is logged once, and the manifest says `quantization: none (<reason>)`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from fasttrack.core.config import LoraConfig, QuantizationConfig, RunConfig
from fasttrack.core.errors import ModelError
from fasttrack.core.lazy import lazy
from fasttrack.core.log import get_logger
from fasttrack.core.store import ArtifactRef
from fasttrack.lib.hub import hub_kwargs, weights_kwargs
from fasttrack.lib.model_files import matches_target
from fasttrack.lib.models import (
    LOAD_LOCK,
    fix_tokenizer,
    load_tokenizer,
    model_source,
    pick_device,
)

torch = lazy("torch")  # imported on first use: a cached run never needs it


@functools.cache
def four_bit_unavailable(device: str) -> str | None:
    """Why 4-bit cannot run on `device`, or None when it can (checked once per process)."""
    try:
        import bitsandbytes.functional as bnbf

        weights = torch.randn(64, 64, device=device)
        packed, state = bnbf.quantize_4bit(weights, quant_type="nf4")
        restored = bnbf.dequantize_4bit(packed, state)
        if not torch.isfinite(restored).all():
            return "bitsandbytes 4-bit round trip produced non-finite values"
    except Exception as exc:  # ImportError, missing native library, unsupported device
        return f"bitsandbytes 4-bit unavailable on {device}: {type(exc).__name__}: {exc}"
    return None


def compute_dtype(q: QuantizationConfig) -> torch.dtype:
    if q.compute_dtype != "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
            q.compute_dtype
        ]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization(q: QuantizationConfig) -> tuple[Any, str]:
    """(BitsAndBytesConfig or None, what the manifest records as the quantization used)."""
    if not q.load_in_4bit:
        return None, "none (load_in_4bit: false)"
    reason = four_bit_unavailable(pick_device())
    if reason:
        get_logger().warning("4-bit QLoRA not possible, training plain LoRA instead: %s", reason)
        return None, f"none ({reason})"
    from transformers import BitsAndBytesConfig

    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(q),
    )
    return bnb, f"4bit-{q.quant_type}{'+double-quant' if q.double_quant else ''}"


def disable_cpu_bf16_repack(model: Any) -> None:
    """bitsandbytes' CPU AVX512-BF16 path repacks 4-bit weights after any no-grad forward and
    then backpropagates through a kernel without autograd: loss stops moving with only a warning
    (see shared/STACK.md). Turning the path off keeps gradients correct."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_for_training(cfg: RunConfig, model_ref: ArtifactRef) -> tuple[Any, Any, str]:
    """(model, tokenizer, quantization used) for adapter training on the model artifact."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    name, revision, _ = model_source(cfg, model_ref)
    tok, _ = load_tokenizer(cfg, model_ref)  # template (override or default), pad token
    bnb, used = quantization(cfg.adapter.quantization)
    device = pick_device()
    kwargs = hub_kwargs(cfg, revision) | weights_kwargs(cfg)
    with LOAD_LOCK:  # see fasttrack/lib/models.py
        model = AutoModelForCausalLM.from_pretrained(
            name,
            dtype=compute_dtype(cfg.adapter.quantization),  # bf16 base on capable CUDA, fp32 on CPU
            quantization_config=bnb,
            device_map={"": device} if bnb else None,
            **kwargs,
        )
    if bnb is not None:
        disable_cpu_bf16_repack(model)
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.sft.gradient_checkpointing
        )
    fix_tokenizer(tok, model.config)  # pad id into the model config
    return model, tok, used


def linear_modules(model: Any) -> list[str]:
    """Full names of the model's Linear layers: 4-bit ones and GPT-2's Conv1D included (peft
    adapts those too; with 4-bit off GPT-2's c_attn is a Conv1D)."""
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    kinds: tuple[type, ...] = (torch.nn.Linear, bnb.nn.Linear4bit, Conv1D)
    return [n for n, m in model.named_modules() if isinstance(m, kinds)]


def linear_module_names(model: Any) -> list[str]:
    """Unique last-name parts of the model's Linear layers (what `target_modules` can name)."""
    return sorted({n.rsplit(".", 1)[-1] for n in linear_modules(model)})


def lora_config(lora: LoraConfig, model: Any):
    """peft LoraConfig from ours; target_modules naming no Linear layer is a clear error."""
    from peft import LoraConfig as PeftLoraConfig

    if lora.target_modules != "all-linear":
        linears = linear_modules(model)
        missing = [t for t in lora.target_modules if not any(matches_target(n, t) for n in linears)]
        available = linear_module_names(model)
        if missing:
            raise ModelError(
                f"adapter.lora.target_modules: {', '.join(missing)} name no Linear module of the "
                f"model; its Linear modules are: {', '.join(available)}"
            )
    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=lora.target_modules,
        bias=lora.bias,
        modules_to_save=lora.modules_to_save or None,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        task_type="CAUSAL_LM",
    )


def trainable_snapshot(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def unchanged_tensors(model: Any, before: dict[str, torch.Tensor]) -> list[str]:
    """Names of trainable tensors training did not move (should be none). FSDP-sharded
    parameters are gathered whole (a collective: every rank calls this, in the same order)."""
    from torch.distributed.tensor import DTensor

    after = dict(model.named_parameters())
    unchanged = []
    for name, old in before.items():
        new = after[name].detach()
        new = new.full_tensor() if isinstance(new, DTensor) else new
        if torch.equal(new.float().cpu(), old.cpu()):
            unchanged.append(name)
    return unchanged


def base_lineage(cfg: RunConfig, model_ref: ArtifactRef, adapter_dir: Path) -> dict[str, Any]:
    """Point the adapter at the base it was trained on, in a form a user can load: the absolute
    store path of the pretrained/base model dir, or the user's own model dir or hub id. Returns
    the manifest's `base_model` entry (stage, key, path)."""
    name, revision, _ = model_source(cfg, model_ref)
    local = Path(name).expanduser()
    path = str(local.resolve()) if local.exists() else name
    config_file = adapter_dir / "adapter_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = path
        config["revision"] = revision
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
    return {"stage": model_ref.stage, "key": model_ref.key, "path": path, "revision": revision}
