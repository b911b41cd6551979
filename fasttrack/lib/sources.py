"""Read data sources and map their formats onto three canonical kinds of rows.

- `corpus`:     {"text", "title", "source"?}                       (format text)
- `sft`:        {"messages": [{"role", "content"}...], "source"?}  (alpaca, sharegpt, messages,
                                                                     prompt_completion)
- `preference`: {"prompt", "chosen", "rejected", "source"?}        (preference)

Why hand-written readers for JSONL: a malformed line must be reported as `file:line`, which the
generic loaders do not do; CSV/parquet/hub datasets go through pandas/pyarrow/`datasets`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fasttrack.core.config import FORMAT_FIELDS, META_FIELDS, SourceConfig
from fasttrack.core.errors import DataError
from fasttrack.core.files import input_digest
from fasttrack.lib.demo import DEMO_DIR

KIND_OF_FORMAT = {
    "text": "corpus",
    "alpaca": "sft",
    "sharegpt": "sft",
    "messages": "sft",
    "prompt_completion": "sft",
    "preference": "preference",
}
FILE_SUFFIXES = {".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".txt", ".md"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bot": "assistant", "system": "system"}  # fmt: skip
ROLES = {"system", "user", "assistant", "tool"}
Row = dict[str, Any]


def resolve(src: SourceConfig) -> tuple[str, Path | str]:
    """(scheme, location): ("file", Path) | ("hf", name) | ("hf-local", Path)."""
    if src.path.startswith("demo:"):
        path = DEMO_DIR / f"{src.path.removeprefix('demo:')}.jsonl"
        if not path.is_file():
            names = sorted(p.stem for p in DEMO_DIR.glob("*.jsonl"))
            raise DataError(f"{src.path}: no such demo source (available: {', '.join(names)})")
        return "file", path
    if src.path.startswith("hf://"):
        name = src.path.removeprefix("hf://").rsplit(":", 1)[0]
        local = Path(name).expanduser()
        return ("hf-local", local) if local.exists() else ("hf", name)
    path = Path(src.path).expanduser()
    if not path.exists():
        raise DataError(f"{src.path}: source file not found (resolved to {path.resolve()})")
    return "file", path


def hf_split(src: SourceConfig) -> str:
    rest = src.path.removeprefix("hf://")
    name, sep, split = rest.rpartition(":")
    return split if sep and name and "/" not in split else "train"


def source_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_SUFFIXES)
    if not files:
        raise DataError(f"{path}: folder has no data files ({', '.join(sorted(FILE_SUFFIXES))})")
    return files


def content_hash(src: SourceConfig) -> str:
    """Hash of a source's bytes (files/folders) or its identity (hub datasets)."""
    scheme, loc = resolve(src)
    if scheme == "hf":
        return f"hf:{loc}:{src.subset}:{hf_split(src)}"
    h = hashlib.sha256()
    for f in source_files(Path(loc)):
        h.update(f"{f.relative_to(loc) if f != loc else f.name}\0{input_digest(f)}\n".encode())
    return h.hexdigest()


def input_bytes(src: SourceConfig) -> int:
    """Bytes of a local source (0 for hub datasets): sizes the data stage's worker pool."""
    scheme, loc = resolve(src)
    return 0 if scheme != "file" else sum(f.stat().st_size for f in source_files(Path(loc)))


def read_rows(
    src: SourceConfig,
    encoding: str = "utf-8",
    max_chars: int | None = None,
    token: str | None = None,
) -> Iterator[tuple[str, Row]]:
    """Yield (location, raw row) for every row of a source; location names file and line.
    `max_chars` bounds what is read for one record (a JSONL line, a text file) before it is
    parsed, so a runaway record fails fast instead of exhausting memory."""
    scheme, loc = resolve(src)
    if scheme != "file":
        yield from _read_hf(src, scheme, loc, token)
        return
    for path in source_files(Path(loc)):
        suffix = path.suffix.lower()
        try:
            if path.stat().st_size == 0:
                raise DataError(f"{path}: file is empty")
            if suffix in (".jsonl", ".ndjson"):
                yield from _read_jsonl(path, encoding, max_chars)
            elif suffix == ".json":
                yield from _read_json(path, encoding)
            elif suffix in (".csv", ".tsv"):
                yield from _read_csv(path, encoding, "\t" if suffix == ".tsv" else ",")
            elif suffix == ".parquet":
                yield from _read_parquet(path)
            else:
                if max_chars and path.stat().st_size > 4 * max_chars:  # > max_chars characters
                    raise DataError(too_long(str(path), max_chars))
                yield str(path), {"text": path.read_text(encoding=encoding), "title": path.stem}
        except UnicodeDecodeError as exc:
            raise DataError(decode_error(path, encoding, exc)) from None


def too_long(where: str, max_chars: int) -> str:
    return (
        f"{where}: record longer than data.max_record_chars ({max_chars:,} characters); "
        "split it, or raise the limit (null = none)"
    )


def decode_error(path: Path, encoding: str, exc: UnicodeDecodeError) -> str:
    """`file:line: not valid <enc> ...`: the line of the first undecodable byte, and a hint when
    the file starts with a UTF-16 byte-order mark (Windows tools write those)."""
    head = path.read_bytes()[:2] if path.stat().st_size else b""
    if head in (b"\xff\xfe", b"\xfe\xff") and not encoding.lower().startswith("utf-16"):
        return f"{path}: UTF-16 text (byte-order mark), not {encoding}; set data.encoding: utf-16"
    with open(path, "rb") as f:  # the decoder works on chunks: find the line ourselves
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode(encoding)
            except UnicodeDecodeError as line_exc:
                return (
                    f"{path}:{lineno}: not valid {encoding} (byte {line_exc.start + 1} of the "
                    f"line: {line_exc.reason}); set data.encoding or re-encode the file"
                )
    return f"{path}: not valid {encoding} ({exc.reason}); set data.encoding or re-encode the file"


def _bom_ok(encoding: str) -> str:
    """Editors on Windows start UTF-8 files with a byte-order mark; accept it, as pandas does."""
    return "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding


def _read_jsonl(path: Path, encoding: str, max_chars: int | None) -> Iterator[tuple[str, Row]]:
    with open(path, encoding=_bom_ok(encoding)) as f:
        lineno = 0
        while line := f.readline(max_chars + 1 if max_chars else -1):
            lineno += 1
            where = f"{path}:{lineno}"
            if max_chars and len(line) > max_chars:
                raise DataError(too_long(where, max_chars))
            if line.strip():
                yield where, parse_json_line(line, where)


def parse_json_line(line: str, where: str) -> Row:
    """One JSONL record (a JSON object), or a DataError naming `where` (file:line)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def _read_json(path: Path, encoding: str) -> Iterator[tuple[str, Row]]:
    try:
        data = json.loads(path.read_text(encoding=_bom_ok(encoding)))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}: item {i}: expected a JSON object, got {type(row).__name__}")
        yield f"{path}: item {i}", row


def _read_csv(path: Path, encoding: str, sep: str) -> Iterator[tuple[str, Row]]:
    """Rows by header name, `file:line` of each. A row with more *or fewer* fields than the
    header is an error (pandas pads short rows with empty fields, which then were dropped
    silently by cleaning as if the user had left them empty)."""
    import csv

    kind = path.suffix[1:].upper()
    with open(path, encoding=_bom_ok(encoding), newline="") as f:
        reader = csv.reader(f, delimiter=sep)
        try:
            header = next(reader, None)
            if header is None or not any(h.strip() for h in header):
                raise DataError(f"{path}: file is empty")
            start = reader.line_num + 1
            for fields in reader:
                if fields and len(fields) != len(header):
                    raise DataError(
                        f"{path}:{start}: malformed {kind}: Expected {len(header)} fields in "
                        f"line {start}, saw {len(fields)}"
                    )
                if fields:
                    yield f"{path}:{start}", dict(zip(header, fields, strict=True))
                start = reader.line_num + 1
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: malformed {kind}: {exc}") from None


def _read_parquet(path: Path) -> Iterator[tuple[str, Row]]:
    import pyarrow.parquet as pq

    i = 0
    try:  # record batches: a large file is never all in memory
        for batch in pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                yield f"{path}: row {i}", row
                i += 1
    except (OSError, ValueError) as exc:  # ArrowInvalid (a ValueError)/OSError: truncated file
        raise DataError(f"{path}: unreadable parquet ({exc})") from None


def _read_hf(
    src: SourceConfig, scheme: str, loc: Path | str, token: str | None
) -> Iterator[tuple[str, Row]]:
    import datasets

    split = hf_split(src)
    try:
        if scheme == "hf-local" and (Path(loc) / "dataset_info.json").exists():
            ds = datasets.load_from_disk(str(loc))
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(str(loc), src.subset, split=split, token=token)
    except Exception as exc:
        raise DataError(f"{src.path}: cannot load dataset ({type(exc).__name__}: {exc})") from None
    for i, row in enumerate(ds):
        yield f"{src.path}: row {i}", row


def iter_source(
    src: SourceConfig,
    encoding: str = "utf-8",
    max_chars: int | None = None,
    token: str | None = None,
) -> Iterator[Row]:
    """Canonical rows of one source, one at a time (memory does not grow with the source);
    raises DataError naming the culprit's file:line."""
    to_row = RowConverter(src, max_chars)
    n = 0
    for where, raw in read_rows(src, encoding, max_chars, token):
        yield to_row(raw, where)
        n += 1
        if src.max_rows and n >= src.max_rows:
            break
    if not n:
        raise DataError(f"{src.path}: no rows")


class RowConverter:
    """A raw row (dict of the file's columns) -> the canonical row of the source's format."""

    def __init__(self, src: SourceConfig, max_chars: int | None) -> None:
        self.format, self.max_chars = src.format, max_chars
        self.fields = FORMAT_FIELDS[src.format]
        self.column = {n: src.columns.get(n, n) for n in (*self.fields, *META_FIELDS)}
        self.convert = _CONVERTERS[src.format]

    def __call__(self, raw: Row, where: str) -> Row:
        column = self.column
        for name, required in self.fields.items():
            if required and column[name] not in raw:
                mapped = f" (mapped from field {name})" if column[name] != name else ""
                have = ", ".join(map(str, raw)) or "none"
                raise DataError(
                    f"{where}: missing column {column[name]!r}{mapped} for format "
                    f"{self.format}; columns are: {have}"
                )
        get = {name: raw.get(column[name]) for name in (*self.fields, *META_FIELDS)}
        row = self.convert(get, where)
        if self.max_chars and row_chars(row) > self.max_chars:
            raise DataError(too_long(where, self.max_chars))
        for meta in META_FIELDS:
            if get[meta] not in (None, ""):
                row[meta] = str(get[meta])
        return row


def load_source(
    src: SourceConfig,
    encoding: str = "utf-8",
    max_chars: int | None = None,
    token: str | None = None,
) -> tuple[str, list[Row]]:
    """(kind, canonical rows) of one source, all in memory; raises DataError naming the culprit."""
    return KIND_OF_FORMAT[src.format], list(iter_source(src, encoding, max_chars, token))


def row_chars(value: Any) -> int:
    """Characters of text in a canonical row (strings in nested lists/dicts)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(row_chars(v) for v in value.values())
    return sum(row_chars(v) for v in value) if isinstance(value, list) else 0


def _text(value: Any, where: str, name: str, optional: bool = False) -> str:
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def _turns(value: Any, where: str, name: str, role_key: str, text_key: str, roles: dict) -> list:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {name!r} must be a non-empty list of turns")
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise DataError(
                f"{where}: {name}[{i}] must be an object with {role_key!r}/{text_key!r}"
            )
        role = roles.get(str(turn[role_key]).lower())
        if role is None:
            raise DataError(f"{where}: {name}[{i}]: unknown role {turn[role_key]!r}")
        out.append({"role": role, "content": _text(turn[text_key], where, f"{name}[{i}]")})
    return out


def _alpaca(get: dict, where: str) -> Row:
    prompt = _text(get["instruction"], where, "instruction")
    extra = _text(get["input"], where, "input", optional=True)
    messages = [{"role": "user", "content": f"{prompt}\n\n{extra}" if extra.strip() else prompt}]
    if system := _text(get["system"], where, "system", optional=True):
        messages.insert(0, {"role": "system", "content": system})
    messages.append({"role": "assistant", "content": _text(get["output"], where, "output")})
    return {"messages": messages}


_CONVERTERS = {
    "text": lambda g, w: {
        "text": _text(g["text"], w, "text"),
        "title": _text(g["title"], w, "title", optional=True),
    },
    "alpaca": _alpaca,
    "sharegpt": lambda g, w: {
        "messages": _turns(g["conversations"], w, "conversations", "from", "value", SHAREGPT_ROLES)
    },
    "messages": lambda g, w: {
        "messages": _turns(g["messages"], w, "messages", "role", "content", {r: r for r in ROLES})
    },
    "prompt_completion": lambda g, w: {
        "messages": [
            {"role": "user", "content": _text(g["prompt"], w, "prompt")},
            {"role": "assistant", "content": _text(g["completion"], w, "completion")},
        ]
    },
    "preference": lambda g, w: _preference(g, w),
}


def _preference(get: dict, where: str) -> Row:
    """Strings, or conversation pairs (message lists, as in UltraFeedback-style datasets):
    the prompt is the last user turn, the answers the last assistant turns."""
    out = {}
    for key, role in (("prompt", "user"), ("chosen", "assistant"), ("rejected", "assistant")):
        value = get[key]
        if isinstance(value, list):
            roles = {r: r for r in ROLES}
            turns = _turns(value, where, key, "role", "content", roles)
            value = next((t["content"] for t in reversed(turns) if t["role"] == role), None)
            if value is None:
                raise DataError(f"{where}: field {key!r} has no {role} turn")
        out[key] = _text(value, where, key)
    return out
