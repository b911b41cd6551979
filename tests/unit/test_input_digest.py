"""`input_digest`: a stage key's input files are hashed once per process while their stat is
unchanged, and any change a writer can make (content, size, mtime, replacement) is seen."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from fasttrack.core import files
from fasttrack.core.config import SourceConfig
from fasttrack.core.files import input_digest
from fasttrack.lib.sources import content_hash


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The real sha256_file, recording each file it reads."""
    reads: list[Path] = []
    real = files.sha256_file

    def counting(path: str | Path, *args: int) -> str:
        reads.append(Path(path))
        return real(path, *args)

    monkeypatch.setattr(files, "sha256_file", counting)
    return reads


def test_hashed_once_while_the_stat_is_unchanged(tmp_path: Path, monkeypatch) -> None:
    reads = _count_reads(monkeypatch)
    f = tmp_path / "corpus.txt"
    f.write_bytes(b"alpha " * 1000)
    assert input_digest(f) == input_digest(f) == _sha(b"alpha " * 1000)
    assert reads == [f]


def test_every_kind_of_change_is_rehashed(tmp_path: Path) -> None:
    f = tmp_path / "corpus.txt"
    f.write_bytes(b"aaaa")
    st = f.stat()
    assert input_digest(f) == _sha(b"aaaa")
    # same size, mtime put back: ctime still moves (a writer cannot set it)
    f.write_bytes(b"bbbb")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert input_digest(f) == _sha(b"bbbb")
    f.write_bytes(b"ccccc")  # size
    assert input_digest(f) == _sha(b"ccccc")
    new = tmp_path / "new.txt"  # replaced by rename (editors, rsync): another inode
    new.write_bytes(b"ddddd")
    os.utime(new, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns))
    new.replace(f)
    assert input_digest(f) == _sha(b"ddddd")


def test_a_key_is_computed_without_rereading_unchanged_sources(tmp_path: Path, monkeypatch) -> None:
    """The data stage's key (computed by Prefect's cache policy and again by the task) reads a
    source once; an edit to it changes the key."""
    f = tmp_path / "docs.jsonl"
    f.write_text('{"text": "one two three"}\n')
    src = SourceConfig(path=str(f), format="text")
    reads = _count_reads(monkeypatch)
    first = content_hash(src)
    assert content_hash(src) == first and reads == [f]
    f.write_text('{"text": "one two four"}\n')
    assert content_hash(src) != first and reads == [f, f]


def test_the_memo_holds_one_entry_per_path(tmp_path: Path) -> None:
    """A long-lived process (server, sweep) re-hashing an edited file keeps one entry for it,
    not one per version it has seen."""
    f = tmp_path / "corpus.txt"
    for i in range(5):
        f.write_bytes(b"x" * (i + 1))
        input_digest(f)
    assert [k for k in files._DIGESTS if k == str(f.resolve())] == [str(f.resolve())]
    assert sum(str(tmp_path) in str(k) for k in files._DIGESTS) == 1
