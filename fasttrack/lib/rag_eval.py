"""The user's own retrieval eval set (`rag.eval`): questions with the source that answers them.

Rows are read by the data readers (tasks/sources.py), so a malformed line is reported as
`file:line` like any data source. A question counts as a hit at rank r when the r-th distinct
retrieved document has the expected title, path (under rag.documents) or id.
"""

from __future__ import annotations

from pathlib import Path

from fasttrack.core.config import SourceConfig
from fasttrack.core.config_eval import RetrievalEvalConfig
from fasttrack.core.errors import DataError
from fasttrack.core.files import input_digest
from fasttrack.lib.sources import read_rows

_SUFFIX = {"jsonl": ".jsonl", "json": ".json", "csv": ".csv", "tsv": ".tsv", "parquet": ".parquet"}


def eval_set_hash(ev: RetrievalEvalConfig) -> str:
    return input_digest(Path(ev.path).expanduser())


def load_eval_set(ev: RetrievalEvalConfig, encoding: str = "utf-8") -> list[tuple[str, str]]:
    """(question, expected source) of every row; DataError naming file:line on a bad row."""
    path = Path(ev.path).expanduser()
    if ev.format != "auto" and path.suffix.lower() != _SUFFIX[ev.format]:
        raise DataError(
            f"rag.eval.path: {path}: format {ev.format} expects a {_SUFFIX[ev.format]} file"
        )
    names = {f: ev.columns.get(f, f) for f in ("question", "expected")}
    out = []
    for where, row in read_rows(SourceConfig(path=str(path), format="text"), encoding):
        values = []
        for field, column in names.items():
            value = row.get(column)
            if column not in row:
                have = ", ".join(map(str, row)) or "none"
                raise DataError(
                    f"{where}: missing column {column!r} (rag.eval.columns.{field}); columns "
                    f"are: {have}"
                )
            if not isinstance(value, str | int) or not str(value).strip():
                raise DataError(f"{where}: rag.eval {field} must be a non-empty string")
            values.append(str(value).strip())
        out.append((values[0], values[1]))
    if not out:
        raise DataError(f"rag.eval.path: {path}: no rows")
    return out
