"""JSONL sources cut into raw byte blocks that are parsed where the batch is processed.

Why: parsing JSON and building canonical rows in the data stage's main process, then pickling
every row to a worker, made the main process the bottleneck (one core for all reading). Here the
main process only reads ~4 MB blocks cut at a line end and counts their line breaks (C-speed
`bytes.count`); a worker (process or Dask) decodes, parses and converts the block, so errors
still name `file:line`. Same rows, same errors, same order as `sources.iter_source`.
Used for local UTF-8 `.jsonl`/`.ndjson` files without `max_rows`; everything else streams rows.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fasttrack.core.config import SourceConfig
from fasttrack.core.errors import DataError
from fasttrack.lib.sources import (
    Row,
    RowConverter,
    decode_error,
    parse_json_line,
    resolve,
    source_files,
    too_long,
)

BLOCK_BYTES = 4_000_000
_BOM = b"\xef\xbb\xbf"
_UTF8 = ("utf-8", "utf8", "utf-8-sig")


@dataclass(frozen=True)
class JsonlBlock:
    """Whole lines of one file (picklable: it travels to worker processes)."""

    src: SourceConfig
    path: str
    first_line: int  # 1-based number of the block's first line
    data: bytes
    max_chars: int | None

    def rows(self) -> list[Row]:
        """The canonical rows of the block; DataError naming file:line for a bad one."""
        try:
            text = self.data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(decode_error(Path(self.path), "utf-8", exc)) from None
        to_row, limit, out = RowConverter(self.src, self.max_chars), self.max_chars, []
        # newline=None: \n, \r\n and \r end lines, exactly as the text-mode reader counts them
        for i, line in enumerate(io.StringIO(text, newline=None)):
            where = f"{self.path}:{self.first_line + i}"
            if limit and len(line) > limit:
                raise DataError(too_long(where, limit))
            if line.strip():
                out.append(to_row(parse_json_line(line, where), where))
        return out


def line_breaks(data: bytes) -> int:
    return data.count(b"\n") + data.count(b"\r") - data.count(b"\r\n")


def jsonl_blocks(src: SourceConfig, encoding: str, max_chars: int | None) -> Iterator[JsonlBlock]:
    """The blocks of every file of `src` in order (check `blocks_apply` first)."""
    any_row = False
    for path in source_files(Path(resolve(src)[1])):
        if path.stat().st_size == 0:
            raise DataError(f"{path}: file is empty")
        with open(path, "rb") as f:
            line, carry, first = 1, b"", True
            while chunk := f.read(BLOCK_BYTES):
                buf = carry + chunk
                if first:
                    buf, first = buf.removeprefix(_BOM), False
                cut = buf.rfind(b"\n") + 1
                if not cut:  # no line end yet: a long line (bounded by max_record_chars)
                    if max_chars and len(buf) > 4 * max_chars + 8:  # > max_chars characters
                        raise DataError(too_long(f"{path}:{line}", max_chars))
                    carry = buf
                    continue
                block, carry = buf[:cut], buf[cut:]
                any_row = any_row or bool(block.strip())
                yield JsonlBlock(src, str(path), line, block, max_chars)
                line += line_breaks(block)
            if carry:
                any_row = any_row or bool(carry.strip())
                yield JsonlBlock(src, str(path), line, carry, max_chars)
    if not any_row:
        raise DataError(f"{src.path}: no rows")


def blocks_apply(src: SourceConfig, encoding: str) -> bool:
    """Local UTF-8 JSONL files and no row limit (which needs a running count)."""
    if src.max_rows or encoding.lower().replace("_", "-") not in _UTF8:
        return False
    scheme, loc = resolve(src)
    if scheme != "file":
        return False
    return all(p.suffix.lower() in (".jsonl", ".ndjson") for p in source_files(Path(loc)))
