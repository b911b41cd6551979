"""What preflight needs from a local model dir, read from its files without torch: the
tokenizer's size (tokenizer.json through the small `tokenizers` library) and the names of the
modules LoRA can adapt (the safetensors headers, and the index of a sharded checkpoint).

Why: importing torch + transformers' model code and building the model on the meta device took
10-25 s on a busy 2-core machine, for checks whose goal is an answer within 5 s (issue #13).
The verdicts are the meta-device ones: tests/unit/test_model_files.py compares both on every
family of the family matrix.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from fasttrack.core.config import RunConfig
from fasttrack.core.errors import ModelError
from fasttrack.lib.hub import hub_kwargs, load_error

# The last name part of an input embedding (token or position): 2-D weights that are not
# Linear layers. `embed_out` (GPT-NeoX's output layer) is a Linear layer and does not match.
_EMBEDDING = re.compile(
    r"^(wte|wpe|embed_tokens|embed_in|embed_positions|word_embeddings|position_embeddings"
    r"|tok_embeddings|token_embedding|embeddings|embedding)$"
)
# Top-level output layers (Linear) as checkpoints name them.
OUTPUT_NAMES = ("lm_head", "embed_out", "output")
# The Linear modules of the `scratch` model (a LlamaForCausalLM; tests check the list).
SCRATCH_LINEARS = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head",
)  # fmt: skip


def is_local_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()


def max_positions(model_or_config: Any) -> int | None:
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "max_position_embeddings", None)


def matches_target(name: str, target: str) -> bool:
    """peft's rule for a list of `target_modules`: the full module name, or a `.`-separated
    suffix of it (peft 0.21 `check_target_module_exists`)."""
    return name == target or name.endswith("." + target)


def model_config(cfg: RunConfig) -> Any:
    """The transformers config of the base model (config.json only, never weights; AutoConfig
    imports no torch). Remote code is refused here unless `model.trust_remote_code`.

    For `scratch`, vocab_size is `model.tokenizer.vocab_size`: the BPE trainer counts our 6
    special tokens within it, so it is exact unless the corpus is too small to reach it."""
    m = cfg.model
    if m.name_or_path == "scratch":
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=m.tokenizer.vocab_size, **m.architecture.model_dump())
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(m.name_or_path, **hub_kwargs(cfg, m.revision))
    except (OSError, ValueError, KeyError) as exc:
        raise load_error(m.name_or_path, exc) from None


def native_model_types() -> set[str]:
    """The `model_type`s this transformers has its own classes for, read from its mapping
    module (`models/auto/auto_mappings.py`, plain data) without importing transformers,
    which imports torch."""
    import importlib.util

    spec = importlib.util.find_spec("transformers")
    roots = list(spec.submodule_search_locations or []) if spec else []
    if not roots:  # pragma: no cover - transformers is a dependency
        return set()
    file = Path(roots[0]) / "models" / "auto" / "auto_mappings.py"
    mapping = importlib.util.spec_from_file_location("_ft_auto_mappings", file)
    module = importlib.util.module_from_spec(mapping)  # type: ignore[arg-type]
    mapping.loader.exec_module(module)  # type: ignore[union-attr]
    return set(module.CONFIG_MAPPING_NAMES) | {"gpt-sw3"}


def read_config(path: Path, trust_remote_code: bool = False) -> dict[str, Any] | None:
    """config.json of a local model dir as a dict, with AutoConfig's verdicts on it: not JSON,
    remote code not allowed, unknown model type. None when it needs the model's own code
    (trusted remote code): the caller asks transformers."""
    file = path / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"model.name_or_path: {file}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModelError(f"model.name_or_path: {file}: not a JSON object")
    model_type = config.get("model_type")
    if model_type in native_model_types():
        return config  # transformers' own class wins over an `auto_map`, as in AutoConfig
    if "AutoConfig" in (config.get("auto_map") or {}):
        if trust_remote_code:
            return None
        raise load_error(str(path), ValueError("trust_remote_code"))
    raise ModelError(
        f"model.name_or_path: {file}: unknown model_type {model_type!r} (not a model this "
        "transformers version knows; a newer transformers may)"
    )


def text_facts(config: dict[str, Any]) -> tuple[int | None, int | None]:
    """(positions, embedding rows) of a config dict: its text config's when it nests one
    (multimodal), `n_positions` where GPT-2-style configs keep the positions."""
    for name in ("decoder", "generator", "text_config"):  # as `get_text_config` searches
        if isinstance(config.get(name), dict):
            config = config[name]
            break
    positions = config.get("max_position_embeddings", config.get("n_positions"))
    return positions, config.get("vocab_size")


def tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape over every safetensors file of a model dir (shards included),
    from the headers alone: 8 bytes of header length, then the JSON header."""
    shapes: dict[str, list[int]] = {}
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def adaptable_modules(path: Path) -> list[str]:
    """Full names of the Linear (and GPT-2 Conv1D) modules of a local checkpoint: every module
    with a 2-D `.weight` that is not an embedding, and the output layer `lm_head` (a Linear
    module even when tied to the embeddings and so not stored)."""
    names = []
    for name, shape in tensor_shapes(path).items():
        if not name.endswith(".weight") or len(shape) != 2:
            continue  # norms and biases (1-D), fused expert tensors (3-D), conv kernels (4-D)
        module = name.removesuffix(".weight")
        if not _EMBEDDING.match(module.rsplit(".", 1)[-1]):
            names.append(module)
    if not names:
        return []
    # the output layer is `lm_head` in the loaded model whatever the checkpoint calls it (GPT-NeoX
    # stores `embed_out`: transformers renames it on load) and when tied (not stored at all)
    return sorted({n for n in names if n not in OUTPUT_NAMES} | {"lm_head"})


def tokenizer_size(path: Path) -> int | None:
    """Tokens of the dir's fast tokenizer (vocabulary + added tokens, what `len(tokenizer)`
    counts), or None when there is no tokenizer.json (a sentencepiece/vocab-file tokenizer:
    the caller asks transformers)."""
    file = path / "tokenizer.json"
    if not file.is_file():
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(file))
    size = tok.get_vocab_size(with_added_tokens=True)
    vocab = tok.get_vocab(with_added_tokens=True)
    config = path / "tokenizer_config.json"  # tokens transformers adds on load when missing
    if config.is_file():
        extra = json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
        size += len({t["content"] for t in extra.values() if isinstance(t, dict)} - set(vocab))
    return size
