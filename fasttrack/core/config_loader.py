"""Loading a run config: YAML -> `RunConfig`, with `--set` overrides and errors that name the
file, the line when known, and the field path (split from fasttrack/core/config.py, the schema).

`load_config` is re-exported by fasttrack.core.config, where callers import it from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from fasttrack.core.config import DEFAULT_CONFIG, RunConfig
from fasttrack.core.config_base import Section
from fasttrack.core.errors import ConfigError

MAX_NODES = 100_000  # values in a config, aliases expanded; a real one has a few hundred


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load and validate a run config; raise ConfigError naming file, line and field."""
    path = Path(path) if path else DEFAULT_CONFIG
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a config file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: not valid UTF-8 ({exc.reason}); save it as UTF-8"
        ) from None
    try:
        raw = yaml.safe_load(text)  # aliases are shared objects here, not copies
        lines = _line_index(yaml.compose(text), path, budget=[MAX_NODES])
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {exc.problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: top level must be a mapping of sections, got {type(raw).__name__}"
        )
    origin = {loc: f"{path}:{line}" for loc, line in lines.items()}
    if isinstance(raw.get("store"), str):  # shorthand; lets `--set store.url=...` apply too
        raw["store"] = {"url": raw["store"]}
    for item in overrides or []:
        loc = apply_override(raw, item)
        origin[loc] = f"{path}: --set {item}"
    base = path.resolve().parent
    resolve_paths(raw, base)
    try:
        cfg = RunConfig.model_validate(raw, context={"config_dir": base})
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, origin)) from None
    cfg._source = str(path)
    return cfg


def resolve_paths(raw: dict[str, Any], base: Path) -> None:
    """Make the input paths of a config absolute, relative to the config file's folder `base`
    (so a config means the same files from any working directory): source paths, a local
    model dir, rag.documents, rag.eval.path, evaluate.lm_eval.include_path. URLs (`hf://`,
    `s3://`), `demo:` names and hub ids are left alone; a model name is a path when it starts
    with `.`, `/` or `~`, or when it exists beside the config. `store` stays relative to the
    working directory, like every command's `--store`."""

    def fix(section: Any, key: str, model: bool = False) -> None:
        value = section.get(key) if isinstance(section, dict) else None
        if not isinstance(value, str) or not value or ":" in value.split("/")[0]:
            return  # unset, a URL/`demo:` name, or a Windows drive
        path = Path(value).expanduser()
        if path.is_absolute():
            return
        explicit = value.startswith((".", "~"))
        if model and not explicit and not (base / path).exists():
            return  # a hub id such as owner/name
        section[key] = str((base / path).resolve()) + ("/" if value.endswith("/") else "")

    data = raw.get("data")
    for src in data.get("sources", []) if isinstance(data, dict) else []:
        fix(src, "path")
    fix(raw.get("model"), "name_or_path", model=True)
    rag = raw.get("rag")
    fix(rag, "documents")
    fix(rag.get("eval") if isinstance(rag, dict) else None, "path")
    ev = raw.get("evaluate")
    fix(ev.get("lm_eval") if isinstance(ev, dict) else None, "include_path")


def field_line(path: Path, field: str) -> int | None:
    """1-based line of a dotted field (`sft.max_length`, `data.sources.0.path`) in a config
    file, or of its nearest enclosing section; None when the file does not set it."""
    try:
        lines = _line_index(
            yaml.compose(path.read_text(encoding="utf-8")), path, budget=[MAX_NODES]
        )
    except (OSError, yaml.YAMLError, ConfigError, UnicodeDecodeError):
        return None
    loc = tuple(field.split("."))
    return next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)


def apply_override(raw: dict[str, Any], item: str) -> tuple[str, ...]:
    """Apply one `section.field=value` override (value parsed as YAML) to the raw dict."""
    dotted, sep, value_text = item.partition("=")
    if not sep or not dotted.strip():
        raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. pretrain.max_steps=50")
    loc = tuple(dotted.strip().split("."))
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError:
        value = value_text
    node: Any = raw
    for i, part in enumerate(loc[:-1]):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item}: {'.'.join(loc[: i + 1])} is not a section")
        node = node.setdefault(part, {})
    if isinstance(node, list) and loc[-1].isdigit() and int(loc[-1]) < len(node):
        node[int(loc[-1])] = value
    elif isinstance(node, dict):
        node[loc[-1]] = value
    else:
        raise ConfigError(f"--set {item}: {'.'.join(loc[:-1])} is not a section")
    return loc


def _describe(exc: ValidationError, path: Path, origin: dict[tuple[str, ...], str]) -> str:
    """One line per pydantic error: `<file>[:line]: <field.path>: <message>`."""
    out = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        where = next((origin[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in origin), None)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            msg = f"unknown key (allowed: {', '.join(allowed)})" if allowed else "unknown key"
        field = ".".join(loc) or "(top level)"
        out.append(f"{where or path}: {field}: {msg}")
    return "\n".join(out)


def _allowed_keys(loc: tuple[str, ...]) -> list[str]:
    model: Any = RunConfig
    for part in loc:
        if part.isdigit():
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        model = next(
            (a for a in (ann, *args) if isinstance(a, type) and issubclass(a, Section)), None
        )
        if model is None:
            return []
    return sorted(model.model_fields)


def _line_index(
    node: yaml.Node | None, path: Path, loc: tuple[str, ...] = (), *, budget: list[int]
) -> dict[tuple[str, ...], int]:
    """Map each key path of a YAML document to its 1-based line number. A key given twice is an
    error: YAML keeps the last silently, so a repeated section would drop the first one.

    The walk expands aliases (every path gets a line), so nested aliases (a "billion laughs"
    config) would grow exponentially: `budget` bounds the paths visited, in time and memory."""
    lines: dict[tuple[str, ...], int] = {}
    budget[0] -= 1
    if budget[0] < 0:
        raise ConfigError(
            f"{path}: the YAML expands to more than {MAX_NODES} values (nested aliases?); refused"
        )
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = (*loc, str(key.value))
            if sub in lines:
                raise ConfigError(
                    f"{path}:{key.start_mark.line + 1}: {'.'.join(sub)}: duplicate key "
                    f"(first given at line {lines[sub]})"
                )
            lines[sub] = key.start_mark.line + 1
            lines.update(_line_index(value, path, sub, budget=budget))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            sub = (*loc, str(i))
            lines[sub] = item.start_mark.line + 1
            lines.update(_line_index(item, path, sub, budget=budget))
    return lines
