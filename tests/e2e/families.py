"""Tiny random checkpoints of real causal-LM families, built offline from their config classes.

Each gets its own byte-level BPE tokenizer with the family's conventions (special tokens, BOS
added or not, pad or not, chat template or none, generation-config stop ids), saved beside the
weights, as a user's local model dir looks. Hidden 64, 2 layers: seconds to train.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fasttrack.core.templates import BUILTIN

HIDDEN, LAYERS, HEADS, POSITIONS = 64, 2, 4, 256


@dataclass(frozen=True)
class Family:
    name: str
    config_class: str  # transformers config class
    bos: str | None
    eos: str
    pad: str | None = None
    extra: tuple[str, ...] = ()
    add_bos: bool = False
    template: str | None = None  # built-in template saved in the tokenizer (None: no template)
    end_of_turn: str | None = None  # in the generation config's eos list, as the family ships
    dtype: torch.dtype = torch.float32
    config: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)  # model section overrides of the run
    slow: bool = False  # the matrix's second half: `pytest -m "not slow"` skips it locally


_ROPE = {
    "hidden_size": HIDDEN,
    "intermediate_size": 2 * HIDDEN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": 2,
    "max_position_embeddings": POSITIONS,
}
_GEMMA = {**_ROPE, "head_dim": HIDDEN // HEADS, "sliding_window": 32}
_GEMMA_TOKENS = {
    "bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "extra": ("<start_of_turn>", "<end_of_turn>"),
    "add_bos": True, "template": "gemma", "end_of_turn": "<end_of_turn>",
}  # fmt: skip

FAMILIES = (
    Family(
        "gpt2", "GPT2Config", bos="<|endoftext|>", eos="<|endoftext|>",
        config={"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_positions": POSITIONS},
    ),
    Family(
        "gpt_neox", "GPTNeoXConfig", bos="<|endoftext|>", eos="<|endoftext|>",
        config={k: v for k, v in _ROPE.items() if k != "num_key_value_heads"}, slow=True,
    ),
    Family(
        "qwen2", "Qwen2Config", bos=None, eos="<|endoftext|>", pad="<|endoftext|>",
        extra=("<|im_start|>", "<|im_end|>"), template="chatml",
        config={**_ROPE, "tie_word_embeddings": True}, slow=True,
    ),
    Family(
        "gemma2", "Gemma2Config", **_GEMMA_TOKENS,
        config={**_GEMMA, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    ),
    Family("gemma3_text", "Gemma3TextConfig", **_GEMMA_TOKENS, config={**_GEMMA}, slow=True),
    Family(
        "phi3", "Phi3Config", bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>",
        extra=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), template="phi3",
        end_of_turn="<|end|>", config={**_ROPE, "num_key_value_heads": HEADS},
    ),
    Family(
        "mistral_untied", "MistralConfig", bos="<s>", eos="</s>", add_bos=True,
        template="mistral", config={**_ROPE, "tie_word_embeddings": False}, slow=True,
    ),
    Family(  # no template in the tokenizer: the run names the built-in one
        "llama3_bf16_untied", "LlamaConfig", bos="<|begin_of_text|>", eos="<|end_of_text|>",
        extra=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), add_bos=True,
        end_of_turn="<|eot_id|>", dtype=torch.bfloat16,
        config={**_ROPE, "tie_word_embeddings": False}, run={"chat_template": "llama3"},
    ),
)  # fmt: skip
BY_NAME = {f.name: f for f in FAMILIES}


def corpus() -> list[str]:
    """The text the tokenizers learn from: the demo corpus the runs train on."""
    import pydoc_data.topics

    return list(pydoc_data.topics.topics.values())


def build_family(family: Family, dest: Path, texts: list[str], seed: int = 0) -> Path:
    """Save a random `family` checkpoint + tokenizer (+ generation config) into `dest`."""
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    from fasttrack.lib.models import build_tokenizer

    tok = build_tokenizer(
        texts, 600, 2, BUILTIN[family.template] if family.template else None,
        bos=family.bos, eos=family.eos, pad=family.pad, extra=family.extra,
        add_bos=family.add_bos,
    )  # fmt: skip
    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    config = getattr(transformers, family.config_class)(vocab_size=len(tok), **ids, **family.config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(family.dtype)
    stops = [tok.eos_token_id]
    if family.end_of_turn:
        stops.append(tok.convert_tokens_to_ids(family.end_of_turn))
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=stops if len(stops) > 1 else stops[0],
        pad_token_id=tok.pad_token_id,
    )
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest
