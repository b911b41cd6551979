"""JSONL read as raw blocks (parsed in the workers) gives the rows and errors of iter_source."""

import json
from pathlib import Path

import pytest

from fasttrack.core.config import SourceConfig
from fasttrack.core.errors import DataError
from fasttrack.lib import jsonl_blocks
from fasttrack.lib.jsonl_blocks import blocks_apply
from fasttrack.lib.jsonl_blocks import jsonl_blocks as blocks
from fasttrack.lib.sources import iter_source


def _both(path: Path, max_chars: int | None = None, fmt: str = "text") -> tuple:
    """(rows or error via iter_source, rows or error via blocks)."""
    src = SourceConfig(path=str(path), format=fmt)
    assert blocks_apply(src, "utf-8")
    out = []
    for read in (
        lambda: list(iter_source(src, "utf-8", max_chars)),
        lambda: [r for b in blocks(src, "utf-8", max_chars) for r in b.rows()],
    ):
        try:
            out.append(read())
        except DataError as exc:
            out.append(str(exc))
    return tuple(out)


def _lines(n: int) -> list[str]:
    return [json.dumps({"text": f"row {i} " + "é" * (i % 7), "id": str(i)}) for i in range(n)]


@pytest.mark.parametrize(
    "raw",
    [
        "\n".join(_lines(60)) + "\n",
        "\r\n".join(_lines(60)),  # CRLF, no final newline
        "\r".join(_lines(20)) + "\n" + "\n".join(_lines(30)),  # lone CR line ends, then LF
        "\ufeff" + "\n\n  \n".join(_lines(40)) + "\n\n",  # BOM, blank lines
        "\n".join([*_lines(45), "{not json", *_lines(3)]) + "\n",
        "\r\n".join([*_lines(45), "[1, 2]", *_lines(3)]),
        "\n".join([*_lines(45), json.dumps({"txt": "x"})]),  # missing column
        "\n".join([*_lines(20), json.dumps({"text": "y" * 500}), *_lines(3)]),  # too long
        "\n\n \n",  # no rows
    ],
)
def test_blocks_match_iter_source(
    raw: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(raw.encode())
    monkeypatch.setattr(jsonl_blocks, "BLOCK_BYTES", 97)  # many blocks, lines cut across reads
    plain, blocked = _both(path, max_chars=300)
    assert blocked == plain


def test_bad_utf8_and_runaway_line_name_the_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jsonl_blocks, "BLOCK_BYTES", 64)
    path = tmp_path / "d.jsonl"
    path.write_bytes(("\n".join(_lines(30)) + "\n").encode() + b'{"text": "\xff"}\n')
    plain, blocked = _both(path)
    assert blocked == plain and ":31: not valid utf-8" in blocked
    path.write_text("\n".join(_lines(10)) + "\n" + json.dumps({"text": "z" * 5000}) + "\n")
    plain, blocked = _both(path, max_chars=1000)
    assert blocked == plain and f"{path}:11: record longer" in blocked


def test_blocks_are_not_used_where_rows_need_counting(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(_lines(3)))
    assert not blocks_apply(SourceConfig(path=str(path), format="text", max_rows=2), "utf-8")
    assert not blocks_apply(SourceConfig(path=str(path), format="text"), "latin-1")
    (tmp_path / "d.csv").write_text("text\nabc\n")
    assert not blocks_apply(SourceConfig(path=str(tmp_path), format="text"), "utf-8")
