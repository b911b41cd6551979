"""Loading models and datasets safely: secrets, remote code, pickle.

- Secrets: the Hugging Face token comes from a Prefect Secret block named by the config
  (`hf_token_secret`) or from the HF_TOKEN environment variable, and is handed to
  `from_pretrained`/`load_dataset` as `token=` at the moment of use. It is never part of a config,
  key, manifest, log line or report (tests/e2e/test_security.py greps for it).
- Code: `trust_remote_code` is off unless the config turns it on (`model.trust_remote_code`).
- Weights: safetensors only. Unpickling a `pytorch_model.bin` can run arbitrary code, so a
  pickle-only checkpoint is refused unless the config says `model.allow_pickle: true`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fasttrack.core.config import RunConfig
from fasttrack.core.errors import ConfigError, ModelError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
    "sentencepiece.bpe.model", "tiktoken.model",
)  # fmt: skip
NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth"}


def hf_token(cfg: RunConfig) -> str | None:
    """The token for gated/private hub repos: the configured Secret block, else HF_TOKEN."""
    if cfg.hf_token_secret:
        from prefect.blocks.system import Secret

        try:
            return Secret.load(cfg.hf_token_secret).get()
        except ValueError:
            raise ConfigError(
                f"hf_token_secret: no Prefect Secret block named {cfg.hf_token_secret!r} "
                "(create one in the UI or with `Secret(value=...).save(name)`)"
            ) from None
    return os.environ.get("HF_TOKEN") or None


def hub_kwargs(cfg: RunConfig, revision: str | None) -> dict[str, Any]:
    """Keyword arguments of every `from_pretrained` call (configs, tokenizers, weights)."""
    return {
        "revision": revision,
        "trust_remote_code": cfg.model.trust_remote_code,
        "token": hf_token(cfg),
    }


def weights_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """`use_safetensors=True` refuses pickle; None (allow_pickle) prefers safetensors."""
    return {"use_safetensors": None if cfg.model.allow_pickle else True}


def check_model_dir(path: Path, allow_pickle: bool = False, field: str = "model.name_or_path"):
    """Fail fast, naming the file, on a local model dir that would fail (or be unsafe) to load:
    no config.json, no tokenizer, pickle-only weights, a truncated/corrupt safetensors file."""
    if not (path / "config.json").is_file():
        raise ModelError(f"{field}: {path}: not a model directory (no config.json)")
    files = [p for p in path.iterdir() if p.is_file()]
    if not any(p.name in TOKENIZER_FILES for p in files):
        raise ModelError(
            f"{field}: {path}: no tokenizer files (one of: {', '.join(TOKENIZER_FILES)})"
        )
    safetensors = sorted(p for p in files if p.suffix == ".safetensors")
    pickles = sorted(
        p.name for p in files if p.suffix in PICKLE_SUFFIXES and p.name not in NOT_WEIGHTS
    )
    if not safetensors and pickles and not allow_pickle:
        raise ModelError(
            f"{field}: {path}: only pickle weights ({', '.join(pickles)}), which can run code "
            "when loaded; convert them to safetensors or set model.allow_pickle: true"
        )
    if not safetensors and not pickles:
        raise ModelError(f"{field}: {path}: no weights (*.safetensors)")
    from safetensors import SafetensorError, safe_open

    for f in safetensors:
        try:
            with safe_open(str(f), framework="numpy"):
                pass  # reads and validates the header against the file size
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"{field}: {f}: corrupt safetensors file ({exc})") from None


def load_error(name: str, exc: Exception, field: str = "model.name_or_path") -> ModelError:
    """One line for a failed `from_pretrained`, with the fix where we know it."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if "trust_remote_code" in text:
        first = "it ships its own Python code; set model.trust_remote_code: true if you trust it"
    elif "safetensors" in text and ("no file named" in text or "does not appear" in text):
        first += " (pickle checkpoints are refused unless model.allow_pickle: true)"
    return ModelError(f"{field}: cannot load {name!r}: {first}")
