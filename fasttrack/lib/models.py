"""Models and tokenizers: the scratch tokenizer, local dir / hub id loading (safely), devices.

Every model stage loads its model through `load_model`, which follows a base artifact's pointer
(see tasks/base.py) or opens a trained model / adapter directory in the store.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

from fasttrack.core.config import RunConfig
from fasttrack.core.errors import ModelError
from fasttrack.core.files import input_digest
from fasttrack.core.lazy import lazy
from fasttrack.core.store import ArtifactRef, ArtifactStore
from fasttrack.core.templates import DEFAULT_TEMPLATE, apply_default, document_bos
from fasttrack.lib.hub import check_model_dir, hub_kwargs, load_error, weights_kwargs
from fasttrack.lib.model_files import is_local_path, max_positions  # noqa: F401 (re-exported)

torch = lazy("torch")  # imported on first use: a cached run never needs it

BOS, EOS, PAD = "<|bos|>", "<|endoftext|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# One EOS ends documents and turns alike, so generation stops where training put EOS. Assistant
# turns carry {% generation %} markers for assistant-only loss in SFT. (Jinja runs with
# trim_blocks: newlines are emitted explicitly.)
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>' + '\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] + '<|endoftext|>' }}{% endgeneration %}"
    "{%- else -%}{{ message['content'] + '<|endoftext|>' }}{%- endif -%}"
    "{{ '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' + '\n' }}{%- endif -%}"
)
POINTER = "source.json"
_FULL_HASH_LIMIT = 64 << 20


def fingerprint_dir(path: Path) -> str:
    """Content fingerprint of a model dir: full sha256 of small files (config, tokenizer,
    template), size + head/tail hash of large weight files (hashing 14 GB on every run is not
    an option; a changed weight file changes its size or its first/last MiB in practice)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts):
        size = f.stat().st_size
        if size <= _FULL_HASH_LIMIT:
            digest = input_digest(f)
        else:
            with open(f, "rb") as fh:
                head = fh.read(1 << 20)
                fh.seek(-(1 << 20), 2)
                digest = hashlib.sha256(head + fh.read()).hexdigest()
        h.update(f"{f.relative_to(path).as_posix()}\0{size}\0{digest}\n".encode())
    return h.hexdigest()


def build_tokenizer(
    texts: list[str],
    vocab_size: int,
    min_frequency: int,
    template: str | None,
    *,
    bos: str | None = BOS,
    eos: str = EOS,
    pad: str | None = PAD,
    extra: tuple[str, ...] = ROLE_TOKENS,
    add_bos: bool = False,
):
    """Byte-level BPE (no unknown tokens, any UTF-8 input) with special tokens + template.

    The defaults are the scratch model's; the keywords build other families' conventions
    (Gemma's `<bos>` prepended to every text with `add_bos`, GPT-2's lone EOS, no pad...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys(t for t in (pad, bos, eos, *extra) if t))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    if add_bos and bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tok.token_to_id(bos))],
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
        additional_special_tokens=[t for t in extra if t not in (bos, eos, pad)],
    )  # fmt: skip
    fast.chat_template = template
    return fast


def tokenizer_facts(tok: Any, config: Any) -> dict[str, Any]:
    """What the manifest says about the base's tokenizer conventions (see README, Bring your
    own model): vocab, whether documents get a BOS, which template, the dtype of the weights."""
    from fasttrack.core.templates import stop_ids

    bos = document_bos(tok)
    return {
        "vocab_size": len(tok),
        "document_bos": None if bos is None else tok.convert_ids_to_tokens(bos),
        "chat_template": "default (ChatML, EOS ends a turn)"
        if tok.chat_template == DEFAULT_TEMPLATE
        else "configured or the model's own",
        "stop_tokens": tok.convert_ids_to_tokens(stop_ids(tok)),
        "dtype": str(weights_dtype(config)).removeprefix("torch."),
    }


def weights_dtype(config: Any) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in (config `dtype`; fp32 when unsaid)."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else torch.float32


def save_dtype(cfg: RunConfig, base_config: Any) -> torch.dtype:
    """dtype that trained/merged models are written in: `model.dtype`, else the base's (a bf16
    base must not come back as fp32, twice the size)."""
    if cfg.model.dtype != "auto":
        return pick_dtype(cfg.model.dtype)
    return weights_dtype(base_config)


def target_dtype(cfg: RunConfig, ref: ArtifactRef) -> torch.dtype:
    """`save_dtype` of a model artifact, from its config alone (no weights loaded)."""
    return save_dtype(cfg, load_tokenizer(cfg, ref)[1])


def cast_checkpoint(path: Path, dtype: torch.dtype) -> None:
    """Rewrite a saved model dir's floating-point weights (and config) in `dtype`: training
    keeps fp32 master weights, the artifact keeps the base's dtype."""
    from safetensors.torch import load_file, save_file

    for f in sorted(path.glob("*.safetensors")):
        tensors = load_file(str(f))
        if all(t.dtype == dtype or not t.is_floating_point() for t in tensors.values()):
            continue
        cast = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
        save_file(cast, str(f), metadata={"format": "pt"})
    config, name = path / "config.json", str(dtype).removeprefix("torch.")
    if config.is_file() and (data := json.loads(config.read_text())).get("dtype") != name:
        data["dtype"] = name
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# One model load at a time per process: transformers builds a model under process-global meta-device
# patching, so two threads loading at once (sweep points, thread-pool evaluations) can leave one
# model with meta tensors ("Cannot copy out of meta tensor"). Loading is I/O; this costs little.
LOAD_LOCK = threading.RLock()


def load_pretrained(
    cfg: RunConfig,
    name: str,
    revision: str | None,
    template: str | None = None,
    dtype: torch.dtype | None = None,
):
    """(model, tokenizer) from a local dir or hub id: safetensors only, remote code off by default.

    `dtype` defaults to the inference dtype (bf16 on capable CUDA); training passes float32 and
    lets the Trainer's autocast do mixed precision."""
    from safetensors import SafetensorError

    adapter = (Path(name) / "adapter_config.json").is_file()  # an SFT/DPO adapter artifact
    if is_local_path(name) and not adapter:
        check_model_dir(Path(name).expanduser(), cfg.model.allow_pickle)
    kwargs = hub_kwargs(cfg, revision) | weights_kwargs(cfg)
    try:
        with LOAD_LOCK:
            model, tok = _load(name, adapter, dtype, cfg, revision, kwargs)
    except (OSError, ValueError, SafetensorError) as exc:
        raise load_error(name, exc) from None
    fix_tokenizer(tok, model.config, template)
    return model, tok


def _load(name: str, adapter: bool, dtype: Any, cfg: RunConfig, revision: Any, kwargs: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name, **hub_kwargs(cfg, revision))
    if adapter:
        from peft import AutoPeftModelForCausalLM

        peft = AutoPeftModelForCausalLM.from_pretrained(name, dtype=dtype or pick_dtype(), **kwargs)
        return peft.merge_and_unload(), tok  # plain weights: faster eval/generation
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or pick_dtype(), **kwargs)
    return model, tok


def fix_tokenizer(tok: Any, config: Any, template: str | None = None) -> None:
    """Pad token (falls back to EOS), template override (else the model's own, else the
    default ChatML of tasks/templates.py), pad id in the model config."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if template:
        tok.chat_template = template
    apply_default(tok)
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tok.pad_token_id


def model_source(cfg: RunConfig, ref: ArtifactRef) -> tuple[str, str | None, str | None]:
    """(name_or_path, revision, template override) behind any model artifact."""
    path = ArtifactStore(cfg.store).local_path(ref)
    pointer = path / POINTER
    if not pointer.exists():
        return str(path), None, None
    src = json.loads(pointer.read_text())
    name = src["name_or_path"]
    if "model_dir" in src and fingerprint_dir(Path(name).expanduser()) != src["model_dir"]:
        raise ModelError(f"{name}: model directory changed since base artifact {ref.short}")
    return name, src.get("revision"), src.get("chat_template")


def load_model(cfg: RunConfig, ref: ArtifactRef, dtype: torch.dtype | None = None):
    """(model, tokenizer) of any model artifact: a base pointer, a base or a trained model dir."""
    return load_pretrained(cfg, *model_source(cfg, ref), dtype=dtype)


def load_tokenizer(cfg: RunConfig, ref: ArtifactRef):
    """(tokenizer, model config) without loading weights (cheap even for a 70B base)."""
    from transformers import AutoConfig, AutoTokenizer

    name, revision, template = model_source(cfg, ref)
    kwargs = hub_kwargs(cfg, revision)
    try:
        tok = AutoTokenizer.from_pretrained(name, **kwargs)
        config = AutoConfig.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise load_error(name, exc) from None
    fix_tokenizer(tok, config, template)
    return tok, config


def pick_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(precision: str = "auto") -> torch.dtype:
    """bf16 where CUDA supports it, fp16 on older CUDA, fp32 on CPU (or as configured)."""
    if precision == "auto":
        if not torch.cuda.is_available():
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
