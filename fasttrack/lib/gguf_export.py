"""GGUF files (llama.cpp's format) from a transformers causal LM, written with the `gguf` package.

Why our own writer instead of llama.cpp's `convert_hf_to_gguf.py`: that script is not packaged
(it lives in the llama.cpp repository, with its own pinned dependencies), while `gguf` (the
library it is built on) is. This module follows the script's conventions for the families it
supports, so llama.cpp and transformers' GGUF loader read the files like theirs:

- architecture `llama` for Llama and Mistral (as the script writes Mistral), `qwen2` for Qwen2.
  `general.name` never says "mistral": transformers 5.23 turns such a llama file into a
  `mistral` GGUF architecture that gguf 0.19 no longer has and fails to load it; as `llama` it
  loads as LlamaForCausalLM, the same computation below Mistral's 4096-token sliding window;
- tensor names from `gguf.TensorNameMap` (the script's own table), Llama/Mistral q/k rows
  permuted into llama.cpp's rotary layout (the script's `LlamaModel.permute`), no `output.weight`
  when the embeddings are tied;
- 1-D tensors (norms, biases) stay F32; 2-D ones are F16, or Q8_0 when a row is whole blocks of 32
  (else F16, as the script falls back);
- the byte-level BPE tokenizer as `tokenizer.ggml.model = gpt2` (tokens, merges, token types with
  the special tokens as CONTROL), pre-tokenizer `gpt-2` (the GPT-2 split regex our tokenizer
  uses), bos/eos/pad ids, and the chat template.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fasttrack.core.errors import ModelError

GGUF_TYPES = {"f16": "F16", "q8_0": "Q8_0"}  # our format suffix -> GGMLQuantizationType name
FILE_TYPES = {"f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}  # -> LlamaFileType name


@dataclass(frozen=True)
class Family:
    """How one transformers model type is written: llama.cpp architecture, q/k permutation."""

    arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool


FAMILIES = {
    "llama": Family("LLAMA", permute_qk=True),
    "mistral": Family("LLAMA", permute_qk=True),
    "qwen2": Family("QWEN2", permute_qk=False),
}


def family_of(config: Any) -> Family:
    family = FAMILIES.get(getattr(config, "model_type", ""))
    if family is None:
        raise ModelError(
            f"export: GGUF export supports model types {', '.join(FAMILIES)}; this model is "
            f"{getattr(config, 'model_type', '?')!r} (use the merged or bnb formats)"
        )
    return family


def permute_rotary(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """HF's half-split rotary rows -> llama.cpp's interleaved pairs (per head)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _tensor_data(data: np.ndarray, kind: str) -> tuple[np.ndarray, Any]:
    """(bytes to write, GGMLQuantizationType) for one tensor under the file's `kind`."""
    import gguf

    qtype = gguf.GGMLQuantizationType
    if data.ndim < 2:
        return data.astype(np.float32), qtype.F32
    if kind == "q8_0":
        try:
            return gguf.quants.quantize(data.astype(np.float32), qtype.Q8_0), qtype.Q8_0
        except (ValueError, gguf.quants.QuantError):
            pass  # a row that is not whole blocks of 32: F16, as the script falls back
    return data.astype(np.float16), qtype.F16


def _weights(model: Any, family: Family) -> list[tuple[str, np.ndarray]]:
    """(GGUF tensor name, float32 array) of every weight, in the model's order."""
    import gguf

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[family.arch], cfg.num_hidden_layers)
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    out = []
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(f"export: no GGUF name for tensor {hf_name!r} ({family.arch})")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if family.permute_qk and hf_name.endswith("q_proj.weight"):
            data = permute_rotary(data, heads, heads)
        elif family.permute_qk and hf_name.endswith("k_proj.weight"):
            data = permute_rotary(data, heads, kv)
        out.append((name, data))
    return out


def _add_tokenizer(writer: Any, tok: Any, vocab_size: int) -> None:
    """gpt2-style BPE vocabulary: tokens in id order (padded to the embedding rows, as the
    script does), merges, types, special ids, template."""
    import gguf

    spec = json.loads(tok.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise ModelError("export: GGUF export supports byte-level BPE tokenizers only")
    vocab = tok.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    n = max(len(tok), vocab_size)
    special = set(tok.all_special_ids)
    tokens, types = [], []
    for i in range(n):
        token = by_id.get(i, f"[PAD{i}]")
        tokens.append(token)
        if i not in by_id:
            types.append(gguf.TokenType.UNUSED)
        elif i in special:
            types.append(gguf.TokenType.CONTROL)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        if (value := getattr(tok, name)) is not None:
            add(value)
    writer.add_add_bos_token(False)  # our tokenizer adds no BOS; the chat template neither
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def write_gguf(model: Any, tok: Any, path: Path, kind: str, name: str = "fasttrack") -> Path:
    """Write `model` (Llama, Mistral or Qwen2) and `tok` as one GGUF file; `kind` f16 or q8_0."""
    import gguf

    if kind not in GGUF_TYPES:
        raise ModelError(f"export: GGUF kind {kind!r} is not one of {', '.join(GGUF_TYPES)}")
    cfg = model.config
    family = family_of(cfg)
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[family.arch]]
    writer = gguf.GGUFWriter(str(path), arch)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_name(re.sub("mistral", "m-istral", name, flags=re.IGNORECASE))  # see above
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(_rope_theta(cfg)))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[kind]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tok, cfg.vocab_size)
    for tname, data in _weights(model, family):
        raw, qtype = _tensor_data(data, kind)
        writer.add_tensor(tname, raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _rope_theta(cfg: Any) -> float:
    """rope_theta, which transformers 5 keeps in `rope_parameters`."""
    params = getattr(cfg, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return theta if theta is not None else getattr(cfg, "rope_theta", 10000.0)


def read_metadata(path: Path) -> dict[str, Any]:
    """Scalar and string metadata of a GGUF file (arrays as lengths), via `gguf.GGUFReader`."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        out[key] = len(value) if isinstance(value, list) else value
    out["tensors"] = {t.name: t.tensor_type.name for t in reader.tensors}
    return out
