"""Broken artifact directories are never invisible: an unreadable manifest is corruption
(verify names it, lookup quarantines it, the run rebuilds, ls and gc list it), and a symlinked
artifact is refused by run, verify, ls and gc alike (gc deletes nothing while one exists)."""

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fasttrack.core import integrity
from fasttrack.core.errors import StoreError
from fasttrack.core.stage import BuildResult, StageSpec, run_stage
from fasttrack.core.store import ArtifactStore
from fasttrack.core.store_admin import gc, verify_all
from flows.cli import app

runner = CliRunner()
UP = StageSpec("demo", "1", {"n": 1})


def _build(out: Path) -> BuildResult:
    (out / "a.bin").write_bytes(b"A" * 64)
    return BuildResult(metrics={"v": 1})


@pytest.fixture(autouse=True)
def _fresh_memo():
    integrity._MEMO.clear()
    yield
    integrity._MEMO.clear()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_unreadable_manifest_is_corrupt_everywhere(tmp_path: Path, damage: str) -> None:
    store, s = ArtifactStore(tmp_path / "s"), str(tmp_path / "s")
    first = run_stage(store, UP, _build)
    run_stage(store, StageSpec("demo", "1", {"n": 9}), _build)  # an intact neighbour
    manifest = Path(first.uri) / "manifest.json"
    text = manifest.read_text()
    if damage == "truncate":
        manifest.write_text(text[: len(text) // 2])
    elif damage == "garbage":
        manifest.write_bytes(b"\xff\xfe not json")
    else:
        manifest.unlink()

    listed = runner.invoke(app, ["ls", "--store", s], env={"COLUMNS": "300"})
    assert listed.exit_code == 0 and "CORRUPT" in listed.stdout, listed.output
    assert first.key[:12] in listed.stdout
    collected = runner.invoke(app, ["gc", "--older-than", "0s", "--dry-run", "--store", s])
    assert f"corrupt: demo/{first.key}" in collected.stderr, collected.output
    checked = runner.invoke(app, ["verify", "--store", s, "--no-quarantine"])
    assert checked.exit_code == 1, checked.output
    assert "verified 2 artifact(s)" in checked.stdout and "1 corrupt" in checked.stdout
    assert f"corrupt: demo/{first.key}: manifest.json:" in checked.stderr

    built: list[int] = []

    def rebuild(out: Path) -> BuildResult:
        built.append(1)
        return _build(out)

    again = run_stage(store, UP, rebuild)  # quarantines under the lock, then rebuilds
    assert built == [1] and not again.reused and store.verify("demo", UP.key) == []
    [note] = (tmp_path / "s/quarantine/demo").glob(f"{UP.key}-*.json")
    assert json.loads(note.read_text())["problems"][0].startswith("manifest.json: ")
    assert verify_all(store) == (2, [])


def test_verify_quarantines_an_unreadable_manifest(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "s")
    ref = run_stage(store, UP, _build)
    (Path(ref.uri) / "manifest.json").write_text('{"key": ')
    checked, [finding] = verify_all(store)
    assert checked == 1 and finding.quarantined_to and finding.key == UP.key
    assert not Path(ref.uri).exists() and store.scan() == ([], [])


def _linked_store(tmp_path: Path) -> tuple[ArtifactStore, Path]:
    """A store whose `later` artifact (built from `demo`) is a symlink to a copy elsewhere."""
    store = ArtifactStore(tmp_path / "s")
    up = run_stage(store, UP, _build)
    down = run_stage(store, StageSpec("later", "1", {"n": 2}, {"up": up}), _build)
    elsewhere = tmp_path / "elsewhere" / down.key
    shutil.copytree(down.uri, elsewhere)
    shutil.rmtree(down.uri)
    os.symlink(elsewhere, down.uri)
    return store, Path(down.uri)


def test_symlinked_artifact_is_refused_by_run_verify_ls(tmp_path: Path) -> None:
    store, link = _linked_store(tmp_path)
    s, key = str(tmp_path / "s"), link.name
    spec = StageSpec("later", "1", {"n": 2}, {"up": store.lookup("demo", UP.key)})
    assert spec.key == key
    with pytest.raises(StoreError, match=r"later/\w{64} is a symlink \(to .*elsewhere"):
        run_stage(store, spec, _build)
    checked, [finding] = verify_all(store)  # reported, never quarantined
    assert checked == 2 and "is a symlink" in finding.problems[0]
    assert finding.quarantined_to is None and link.is_symlink()
    result = runner.invoke(app, ["verify", "--store", s])
    assert result.exit_code == 1 and f"corrupt: later/{key}:" in result.stderr
    listed = runner.invoke(app, ["ls", "--store", s], env={"COLUMNS": "300"})
    assert "SYMLINK (refused)" in listed.stdout and key[:12] in listed.stdout


def test_gc_never_deletes_what_a_symlinked_artifact_was_built_from(tmp_path: Path) -> None:
    store, link = _linked_store(tmp_path)
    with pytest.raises(StoreError, match=r"gc: nothing removed: .* is a symlink"):
        gc(store, max_age_s=0)  # age 0: without the refusal, `demo` would be garbage
    result = runner.invoke(app, ["gc", "--older-than", "0s", "--store", str(tmp_path / "s")])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "is a symlink" in errors[0]
    assert store.lookup("demo", UP.key) is not None  # the upstream is still there


def test_symlinked_stage_directory_is_refused(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "s")
    ref = run_stage(store, UP, _build)
    os.rename(tmp_path / "s" / "demo", tmp_path / "moved")
    os.symlink(tmp_path / "moved", tmp_path / "s" / "demo")
    with pytest.raises(StoreError, match=r"/s/demo is a symlink"):
        store.read_manifest("demo", ref.key)
    assert [b.key for b in store.scan()[1]] == [ref.key]
