"""Corrupt artifacts are found on lookup, quarantined (never deleted) and rebuilt; stamps save
re-hashing only for files nobody touched; a full disk is one clear error and leaves nothing."""

import json
from pathlib import Path

import pytest

from fasttrack.core import integrity
from fasttrack.core.errors import StoreError
from fasttrack.core.stage import BuildResult, StageSpec, run_stage
from fasttrack.core.store import ArtifactStore
from tests.conftest import disk_full_on_publish

SPEC = StageSpec("demo", "1", {"n": 1})


def _build(out: Path) -> BuildResult:
    (out / "a.bin").write_bytes(b"A" * 64)
    (out / "b.txt").write_text("hello")
    return BuildResult(metrics={"v": 1})


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with open(path, "r+b") as f:  # in place, same size: the size check cannot see it
        f.write(data)


@pytest.fixture(autouse=True)
def _fresh_memo():
    integrity._MEMO.clear()
    yield
    integrity._MEMO.clear()


def _count_hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = integrity.sha256_file

    def counting(path, *a, **k):
        calls.append(Path(path).name)
        return real(path, *a, **k)

    monkeypatch.setattr(integrity, "sha256_file", counting)
    return calls


@pytest.mark.parametrize("damage", ["flip", "resize", "delete"])
def test_corrupt_artifact_is_quarantined_and_rebuilt(tmp_path: Path, damage: str) -> None:
    store = ArtifactStore(tmp_path / "s")
    first = run_stage(store, SPEC, _build)
    target = Path(first.uri) / "a.bin"
    if damage == "flip":
        _flip(target)
    elif damage == "resize":
        target.write_bytes(b"A" * 10)
    else:
        target.unlink()
    bad_bytes = target.read_bytes() if target.exists() else None
    built: list[int] = []

    def rebuild(out: Path) -> BuildResult:
        built.append(1)
        return _build(out)

    again = run_stage(store, SPEC, rebuild)
    assert built == [1] and not again.reused  # recomputed, not reused
    assert store.verify("demo", SPEC.key) == []
    [moved] = [p for p in (tmp_path / "s/quarantine/demo").glob(f"{SPEC.key}-*") if p.is_dir()]
    note = json.loads(Path(f"{moved}.json").read_text())
    expected = {"flip": "a.bin: sha256 mismatch", "resize": "a.bin: size 10 != 64",
                "delete": "a.bin: missing"}[damage]  # fmt: skip
    assert note["key"] == SPEC.key and expected in note["problems"][0]
    if bad_bytes is not None:  # the evidence is kept as it was
        assert (moved / "a.bin").read_bytes() == bad_bytes
    assert (moved / "manifest.json").exists()
    assert [m["key"] for m in store.manifests()] == [SPEC.key]  # quarantine is no artifact


def test_stamp_skips_rehash_of_untouched_files_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ArtifactStore(tmp_path / "s")
    run_stage(store, SPEC, _build)
    calls = _count_hashes(monkeypatch)
    assert integrity.check(store, "demo", SPEC.key)[1] == []
    assert sorted(calls) == ["a.bin", "b.txt"]
    # Files written just now are "racy": their stamp is not trusted yet, so they are re-hashed.
    integrity._MEMO.clear()
    assert integrity.check(store, "demo", SPEC.key)[1] == [] and len(calls) == 4
    # Once files are older than the racy window, a persisted stamp answers without hashing.
    monkeypatch.setattr(integrity, "RACY_S", -60.0)  # as if the files were written long ago
    integrity.check(store, "demo", SPEC.key)
    integrity._MEMO.clear()  # another process: only the stamp file is left
    del calls[:]
    ref, problems = integrity.check(store, "demo", SPEC.key)
    assert ref is not None and problems == [] and calls == []
    # ...but a modified file is re-hashed (its ctime changed) and the mismatch found.
    _flip(Path(ref.uri) / "b.txt")
    assert integrity.check(store, "demo", SPEC.key) == (None, ["b.txt: sha256 mismatch"])
    assert calls == ["b.txt"]
    # FASTTRACK_VERIFY=full ignores persisted stamps.
    (Path(ref.uri) / "b.txt").write_text("hello")
    integrity.check(store, "demo", SPEC.key)
    integrity._MEMO.clear()
    del calls[:]
    monkeypatch.setenv("FASTTRACK_VERIFY", "full")
    assert integrity.check(store, "demo", SPEC.key)[1] == [] and sorted(calls) == ["a.bin", "b.txt"]


def test_quarantine_never_moves_a_rebuilt_artifact(tmp_path: Path) -> None:
    """Detection outside the lock does not move anything: only the re-check under it does."""
    store = ArtifactStore(tmp_path / "s")
    ref = run_stage(store, SPEC, _build)
    _flip(Path(ref.uri) / "a.bin")
    assert integrity.checked_lookup(store, "demo", SPEC.key) is None
    assert Path(ref.uri).exists()  # detected, not moved (no fix)
    assert integrity.checked_lookup(store, "demo", SPEC.key, fix=True) is None
    assert not Path(ref.uri).exists()
    assert integrity.quarantine(store, "demo", SPEC.key, ["again"]) is None  # already gone


def test_disk_full_while_publishing_is_one_clear_error(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "s")
    with disk_full_on_publish(), pytest.raises(StoreError, match=r"demo \w{12}: no space left"):
        run_stage(store, SPEC, _build)
    assert store.manifests() == [] and not (tmp_path / "s" / "demo").exists()
    assert list((tmp_path / "s" / "tmp").iterdir()) == []
    assert not run_stage(store, SPEC, _build).reused
    assert store.verify("demo", SPEC.key) == []
