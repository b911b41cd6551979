"""Preflight: every input mistake that can be found without reading the data or loading weights,
found before the first stage runs (and before Prefect's API starts, when called from the CLI).

Why: a missing source file, a pickle-only or remote-code model, a tokenizer larger than the
embedding matrix or a length past the model's positions used to surface 45-120 s into a run
(or as an IndexError traceback in a training child). Each check here costs milliseconds to a
second: file metadata, `config.json` via AutoConfig, the tokenizer files, and the model
instantiated on the meta device (no memory) for LoRA target names.

`fasttrack run`, `fasttrack plan` and the pipeline flow all call `preflight(cfg, stages)`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fasttrack.core.config import RunConfig
from fasttrack.core.errors import ConfigError, DataError, ModelError

MODEL_STAGES = {"pretrain", "sft", "dpo", "evaluate"}
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


# ---- model ---------------------------------------------------------------------------------
def check_model(cfg: RunConfig, wanted: set[str]) -> None:
    """Model dir rules, vocab vs embeddings, lengths vs positions, LoRA targets, template."""
    from fasttrack.lib.hub import check_model_dir, hub_kwargs
    from fasttrack.lib.models import is_local_path
    from fasttrack.lib.planner import model_config

    m = cfg.model
    name = m.name_or_path
    # a hub id is `name` or `owner/name`; anything else can only be a (missing) folder
    local = name != "scratch" and (is_local_path(name) or name.count("/") > 1)
    if local:
        path = Path(m.name_or_path).expanduser()
        if not path.exists():
            at = where(cfg, "model.name_or_path")
            raise ModelError(f"{at}: {name}: no such model directory{REL}")
        check_model_dir(path, m.allow_pickle)
    config = model_config(cfg)  # config.json only; remote code refused here (load_error)
    tok = None
    if m.name_or_path != "scratch":
        tok = _tokenizer(cfg, hub_kwargs(cfg, m.revision))
        check_vocab(cfg, config, len(tok))
    check_lengths(cfg, config, wanted)
    if wanted & {"sft", "dpo"}:  # (no template: the documented ChatML-on-EOS default applies)
        check_lora_targets(cfg, config)


def _tokenizer(cfg: RunConfig, kwargs: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    from fasttrack.lib.hub import load_error

    try:
        return AutoTokenizer.from_pretrained(cfg.model.name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise load_error(cfg.model.name_or_path, exc) from None


def embedding_rows(config: Any) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "vocab_size", None)


def check_vocab(cfg: RunConfig, config: Any, tokenizer_size: int) -> None:
    """A token id past the embedding matrix is an IndexError deep in training: refuse it here,
    unless `model.resize_embeddings: true` (then the base model's embeddings grow on load)."""
    rows = embedding_rows(config)
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


def check_lengths(cfg: RunConfig, config: Any, wanted: set[str]) -> None:
    from fasttrack.lib.models import max_positions

    limit = max_positions(
        config.get_text_config() if hasattr(config, "get_text_config") else config
    )
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


def check_lora_targets(cfg: RunConfig, config: Any) -> None:
    """`target_modules` must name Linear/Conv1D modules of the model (meta device, no memory)."""
    from fasttrack.lib.adapters import matches_target
    from fasttrack.lib.planner import model_shape

    targets = cfg.adapter.lora.target_modules
    if targets == "all-linear":
        return
    linears = model_shape(config, cfg.model.trust_remote_code).linears
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
