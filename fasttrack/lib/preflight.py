"""Preflight: every input mistake that can be found without reading the data or loading weights,
found before the first stage runs (and before Prefect's API starts, when called from the CLI).

Why: a missing source file, a pickle-only or remote-code model, a tokenizer larger than the
embedding matrix or a length past the model's positions used to surface 45-120 s into a run
(or as an IndexError traceback in a training child). Each check here costs milliseconds to a
second and imports no torch: file metadata, `config.json` via AutoConfig, the tokenizer's
size from tokenizer.json, LoRA target names from the safetensors headers
(fasttrack/lib/model_files.py).

`fasttrack run`, `fasttrack plan` and the pipeline flow all call `preflight(cfg, stages)`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fasttrack.core.config import RunConfig
from fasttrack.core.errors import ConfigError, DataError, ModelError

MODEL_STAGES = {"pretrain", "sft", "dpo", "evaluate"}
RAG_PROMPT_OVERHEAD = 48  # instruction, "Question:", a short question, chat-template markers
RAG_CHUNK_HEADER = 8  # "[n] <title>: " before each chunk
REL = " (relative paths resolve against the config file's folder)"
_PASSED: set[str] = set()  # configs already checked in this process (CLI, then the flow)


def preflight(cfg: RunConfig, stages: Iterable[str]) -> None:
    """Raise the first FastTrackError a run of `stages` would hit on its inputs."""
    wanted = set(stages) - {n for n in ("sft", "dpo", "rag") if not getattr(cfg, n).enabled}
    token = f"{cfg.model_dump_json()}|{sorted(wanted)}"
    if token in _PASSED:
        return
    check_sources(cfg)
    if "rag" in wanted:
        check_rag_inputs(cfg)
    if wanted & MODEL_STAGES:
        check_model(cfg, wanted)
    if "evaluate" in wanted:
        check_lm_eval(cfg)
    _PASSED.add(token)


def check_lm_eval(cfg: RunConfig) -> None:
    """evaluate.lm_eval: the harness installed and include_path a folder (before any stage)."""
    import importlib.util

    lm = cfg.evaluate.lm_eval
    if lm is None:
        return
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(
            f"{where(cfg, 'evaluate.lm_eval')}: lm-evaluation-harness is not installed: "
            "pip install 'llm-fasttrack[eval]'"
        )
    if lm.include_path and not Path(lm.include_path).expanduser().is_dir():
        raise DataError(
            f"{where(cfg, 'evaluate.lm_eval.include_path')}: {lm.include_path}: no such folder{REL}"
        )


# ---- data ----------------------------------------------------------------------------------
def check_sources(cfg: RunConfig) -> None:
    """Every source resolves (file/folder exists, demo name known), has data files, and each
    file is readable and not empty. Hub datasets are checked when loaded (they need the hub)."""
    from fasttrack.lib.sources import resolve, source_files

    for i, src in enumerate(cfg.data.sources):
        field = f"data.sources.{i}.path"
        try:
            scheme, loc = resolve(src)
        except DataError:
            if src.path.startswith("demo:"):
                raise
            raise DataError(
                f"{where(cfg, field)}: {src.path}: source file not found{REL}"
            ) from None
        if scheme != "file":
            continue
        for f in source_files(Path(loc)):
            _readable(f)


def _readable(path: Path) -> None:
    try:
        with open(path, "rb") as fh:
            if not fh.read(1):
                raise DataError(f"{path}: file is empty")
    except PermissionError:
        raise DataError(f"{path}: not readable (permission denied)") from None
    except IsADirectoryError:  # pragma: no cover - source_files lists files only
        raise DataError(f"{path}: is a directory") from None


def check_rag_inputs(cfg: RunConfig) -> None:
    docs = cfg.rag.documents
    if docs and not Path(docs).expanduser().is_dir():
        raise DataError(f"{where(cfg, 'rag.documents')}: {docs}: no such folder{REL}")
    rag_eval = getattr(cfg.rag, "eval", None)
    if rag_eval is not None:
        path = Path(rag_eval.path).expanduser()
        if not path.is_file():
            raise DataError(f"{where(cfg, 'rag.eval.path')}: {rag_eval.path}: file not found{REL}")
        _readable(path)
        from fasttrack.lib.rag_eval import load_eval_set

        load_eval_set(rag_eval, cfg.data.encoding)  # small: its bad rows are worth finding now


# ---- model ----------------------------------------------------------------------------------
def check_model(cfg: RunConfig, wanted: set[str]) -> None:
    """Model dir rules, vocab vs embeddings, lengths vs positions, LoRA targets.
    A local dir is read from its files (config.json, tokenizer.json, safetensors headers) and
    `scratch` from the config: no torch, no weights. A hub id goes through transformers."""
    from fasttrack.lib.hub import check_model_dir, hub_kwargs
    from fasttrack.lib.model_files import (
        is_local_path,
        max_positions,
        model_config,
        read_config,
        text_facts,
        tokenizer_size,
    )

    m = cfg.model
    name = m.name_or_path
    # a hub id is `name` or `owner/name`; anything else can only be a (missing) folder
    local = name != "scratch" and (is_local_path(name) or name.count("/") > 1)
    path = Path(name).expanduser() if local else None
    if path is not None:
        if not path.exists():
            at = where(cfg, "model.name_or_path")
            raise ModelError(f"{at}: {name}: no such model directory{REL}")
        check_model_dir(path, m.allow_pickle)
    config: Any = None  # the transformers config, where only transformers can read it
    if name == "scratch":
        limit, rows = m.architecture.max_position_embeddings, None
    elif path is not None and (raw := read_config(path, m.trust_remote_code)) is not None:
        limit, rows = text_facts(raw)
    else:  # a hub id, or trusted remote code: AutoConfig (config.json only, no weights)
        config = model_config(cfg)
        limit, rows = max_positions(text_config(config)), embedding_rows(config)
    if name != "scratch":
        size = tokenizer_size(path) if path is not None else None
        if size is None:
            size = len(_tokenizer(cfg, hub_kwargs(cfg, m.revision)))
        check_vocab(cfg, rows, size)
    check_lengths(cfg, limit, wanted)
    if cfg.rag.enabled and wanted & {"rag", "evaluate"}:
        check_rag_prompt(cfg, limit)
    if wanted & {"sft", "dpo"}:  # (no template: the documented ChatML-on-EOS default applies)
        check_lora_targets(cfg, path, config)


def _tokenizer(cfg: RunConfig, kwargs: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    from fasttrack.lib.hub import load_error

    try:
        return AutoTokenizer.from_pretrained(cfg.model.name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise load_error(cfg.model.name_or_path, exc) from None


def embedding_rows(config: Any) -> int | None:
    return getattr(text_config(config), "vocab_size", None)


def check_vocab(cfg: RunConfig, rows: int | None, tokenizer_size: int) -> None:
    """A token id past the embedding matrix is an IndexError deep in training: refuse it here,
    unless `model.resize_embeddings: true` (then the base model's embeddings grow on load)."""
    if rows is None or tokenizer_size <= rows or cfg.model.resize_embeddings:
        return
    raise ModelError(
        f"{where(cfg, 'model.name_or_path')}: {cfg.model.name_or_path}: the tokenizer has "
        f"{tokenizer_size} tokens but the embedding matrix only {rows} rows; set "
        "model.resize_embeddings: true to grow it (new rows are trained from scratch)"
    )


def lengths(cfg: RunConfig, wanted: set[str]) -> list[tuple[str, int]]:
    """(field, tokens) of every sequence length the wanted stages will feed the model."""
    out = []
    if "pretrain" in wanted:
        out.append(("pretrain.block_size", cfg.pretrain.block_size))
    if "sft" in wanted:
        out.append(("sft.max_length", cfg.sft.max_length))
    if "dpo" in wanted:
        out.append(("dpo.max_length", cfg.dpo.max_length))
    if "evaluate" in wanted:
        out.append(("evaluate.answers.max_length", cfg.evaluate.answers.max_length))
        out.append(("evaluate.perplexity.max_length", cfg.evaluate.perplexity.max_length))
    if "evaluate" in wanted or "rag" in wanted:  # RAG prompts keep room for the answer
        out.append(("generation.max_new_tokens", cfg.generation.max_new_tokens + 1))
    return out


def check_lengths(cfg: RunConfig, limit: int | None, wanted: set[str]) -> None:
    if not limit:
        return
    for field, n in lengths(cfg, wanted):
        if n > limit:
            what = (
                "leaves no room for a prompt in"
                if field.startswith("generation")
                else ("is larger than")
            )
            shown = n - 1 if field.startswith("generation") else n
            raise ConfigError(
                f"{where(cfg, field)} ({shown}) {what} the model's "
                f"max_position_embeddings ({limit}) ({cfg.model.name_or_path})"
            )


def rag_prompt_tokens(cfg: RunConfig) -> int:
    """About how many tokens a RAG prompt plus its answer takes: top_k chunks of
    `rag.chunk.size_tokens` (embedder tokens: the model's tokenizer may count more) + the
    instruction, question and chat-template markers + a citation header per chunk +
    max_new_tokens. An estimate: the chunks are not known before the index is built."""
    k, size = cfg.rag.top_k, cfg.rag.chunk.size_tokens
    return k * (size + RAG_CHUNK_HEADER) + RAG_PROMPT_OVERHEAD + cfg.generation.max_new_tokens


def check_rag_prompt(cfg: RunConfig, limit: int | None) -> str | None:
    """Warn (and return the line) when top_k chunks, the question and the answer do not fit
    the model's positions: the prompt then carries only the best-ranked chunks that fit
    (`ask.fitted_prompt`). A warning, not an error: the answer still runs on what fits, and
    ask/serve take `k` per request."""
    need = rag_prompt_tokens(cfg)
    if not limit or need <= limit:
        return None
    line = (
        f"{where(cfg, 'rag.top_k')}: a RAG prompt needs about {need} tokens (rag.top_k "
        f"{cfg.rag.top_k} x rag.chunk.size_tokens {cfg.rag.chunk.size_tokens} + about "
        f"{RAG_PROMPT_OVERHEAD + cfg.rag.top_k * RAG_CHUNK_HEADER} for the question, template "
        f"and citations + generation.max_new_tokens {cfg.generation.max_new_tokens}) but the "
        f"model has {limit} positions ({cfg.model.name_or_path}): the lowest-ranked chunks "
        "will be left out of the prompt; lower rag.top_k or rag.chunk.size_tokens"
    )
    logging.getLogger("fasttrack.preflight").warning("warning: %s", line)
    return line


def text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_lora_targets(cfg: RunConfig, path: Path | None = None, config: Any = None) -> None:
    """`target_modules` must name Linear/Conv1D modules of the model: read from the safetensors
    headers of a local dir, else from the model built on the meta device (no memory)."""
    from fasttrack.lib.model_files import SCRATCH_LINEARS, adaptable_modules, matches_target

    targets = cfg.adapter.lora.target_modules
    if targets == "all-linear":
        return
    if cfg.model.name_or_path == "scratch":
        linears = list(SCRATCH_LINEARS)
    elif path is not None and (found := adaptable_modules(path)):
        linears = found
    else:  # a hub model (or a pickle-only dir): its structure from transformers
        from fasttrack.lib.model_files import model_config
        from fasttrack.lib.planner import model_shape

        config = config if config is not None else model_config(cfg)
        linears = list(model_shape(config, cfg.model.trust_remote_code).linears)
    missing = [t for t in targets if not any(matches_target(n, t) for n in linears)]
    if missing:
        names = sorted({n.rsplit(".", 1)[-1] for n in linears})
        from fasttrack.core.config_loader import field_line

        field, source = "adapter.lora.target_modules", getattr(cfg, "_source", None)
        if source and field_line(Path(source), "adapter") is None:
            field = "sft.lora.target_modules"  # the deprecated place this config uses
        raise ModelError(
            f"{where(cfg, field)}: {', '.join(missing)} name no Linear "
            f"module of the model; its Linear modules are: {', '.join(names)}"
        )


# ---- where ---------------------------------------------------------------------------------
def where(cfg: RunConfig, field: str) -> str:
    """`<config file>:<line>: <field>` for an error message (the line when the file sets it)."""
    from fasttrack.core.config_loader import field_line

    source = getattr(cfg, "_source", None)
    if source is None:
        return field
    line = field_line(Path(source), field)
    return f"{source}:{line}: {field}" if line else f"{source}: {field}"
