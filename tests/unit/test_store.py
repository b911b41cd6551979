import json
import multiprocessing as mp
import os
import shutil
import socket
from pathlib import Path

import pytest

from fasttrack.core.errors import StoreError
from fasttrack.core.stage import BuildResult, StageSpec, run_stage
from fasttrack.core.store import ArtifactStore, compute_key


def test_key_is_deterministic_and_sensitive() -> None:
    base = compute_key("pretrain", "1", {"lr": 1e-3, "steps": 5}, {"data": "a"}, {"f": "h"})
    assert base == compute_key("pretrain", "1", {"steps": 5, "lr": 1e-3}, {"data": "a"}, {"f": "h"})
    variants = [
        compute_key("sft", "1", {"lr": 1e-3, "steps": 5}, {"data": "a"}, {"f": "h"}),
        compute_key("pretrain", "2", {"lr": 1e-3, "steps": 5}, {"data": "a"}, {"f": "h"}),
        compute_key("pretrain", "1", {"lr": 2e-3, "steps": 5}, {"data": "a"}, {"f": "h"}),
        compute_key("pretrain", "1", {"lr": 1e-3, "steps": 5}, {"data": "b"}, {"f": "h"}),
        compute_key("pretrain", "1", {"lr": 1e-3, "steps": 5}, {"data": "a"}, {"f": "x"}),
    ]
    assert len({base, *variants}) == 6
    assert len(base) == 64


def _spec(n: int = 1) -> StageSpec:
    return StageSpec("demo", "1", {"n": n})


def _build(out: Path) -> BuildResult:
    (out / "a.txt").write_text("hello")
    (out / "sub").mkdir()
    (out / "sub" / "b.bin").write_bytes(b"\x00" * 100)
    return BuildResult(metrics={"score": 1.5}, device={"device": "cpu", "dtype": "fp32"})


def test_publish_lookup_and_manifest(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "s")
    spec = _spec()
    assert store.lookup("demo", spec.key) is None
    ref = run_stage(store, spec, _build)
    assert not ref.reused and ref.metrics == {"score": 1.5}
    manifest = json.loads((Path(ref.uri) / "manifest.json").read_text())
    assert manifest["key"] == spec.key and manifest["stage"] == "demo"
    assert manifest["config"] == {"n": 1} and manifest["version"] == "1"
    assert {f["path"] for f in manifest["files"]} == {"a.txt", "sub/b.bin"}
    assert all(len(f["sha256"]) == 64 for f in manifest["files"])
    assert "torch" in manifest["versions"] and manifest["device"]["dtype"] == "fp32"
    assert manifest["timings"]["seconds"] >= 0 and manifest["created_at"]
    again = run_stage(store, spec, lambda out: pytest.fail("must not rebuild"))
    assert again.reused and again.key == ref.key
    assert store.verify("demo", spec.key) == []


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "s")

    def half_then_crash(out: Path) -> BuildResult:
        (out / "half.bin").write_bytes(b"x" * 10)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run_stage(store, _spec(), half_then_crash)
    assert store.lookup("demo", _spec().key) is None
    assert not (tmp_path / "s" / "demo").exists()
    assert list((tmp_path / "s" / "tmp").iterdir()) == []


def test_incomplete_or_corrupt_artifacts_are_not_found(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "s")
    ref = run_stage(store, _spec(), _build)
    path = Path(ref.uri)
    (path / "a.txt").write_text("hello, truncated?")  # size differs from the manifest
    assert store.lookup("demo", ref.key) is None
    (path / "a.txt").write_text("jello")  # same size, other bytes: only verify() sees it
    assert store.lookup("demo", ref.key) is not None
    assert store.verify("demo", ref.key) == ["a.txt: sha256 mismatch"]
    (path / "manifest.json").unlink()  # no manifest = not an artifact
    assert store.lookup("demo", ref.key) is None


def test_force_replaces_artifact(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "s")
    first = run_stage(store, _spec(), _build)

    def other(out: Path) -> BuildResult:
        (out / "c.txt").write_text("new")
        return BuildResult(metrics={"score": 2.0})

    second = run_stage(store, _spec(), other, force=True)
    assert second.key == first.key and second.metrics == {"score": 2.0}
    assert sorted(p.name for p in Path(second.uri).iterdir()) == ["c.txt", "manifest.json"]


def test_concurrent_publish_of_same_key_keeps_first(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "s")
    spec = _spec()
    with store.staging("demo", spec.key) as a, store.staging("demo", spec.key) as b:
        (a / "f").write_text("A")
        (b / "f").write_text("B")
        ra = store.publish("demo", spec.key, a, config={})
        rb = store.publish("demo", spec.key, b, config={})
    assert not ra.reused and rb.reused
    assert (Path(ra.uri) / "f").read_text() == "A"


def _race(root: str, marker: str) -> None:
    store = ArtifactStore(root)

    def build(out: Path) -> BuildResult:
        with open(marker, "a") as f:
            f.write(f"{os.getpid()}\n")
        (out / "f").write_text(str(os.getpid()))
        return BuildResult()

    run_stage(store, _spec(), build)


def test_two_processes_build_a_key_once(tmp_path: Path) -> None:
    marker = tmp_path / "built.txt"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_race, args=(str(tmp_path / "s"), str(marker))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(marker.read_text().split()) == 1  # the lock made the second one reuse
    assert ArtifactStore(tmp_path / "s").lookup("demo", _spec().key) is not None


@pytest.mark.parametrize("url", ["memory://fasttrack-test", "file://{tmp}/s"])
def test_fsspec_urls(url: str, tmp_path: Path) -> None:
    store = ArtifactStore(url.format(tmp=tmp_path), cache_dir=tmp_path / "cache")
    ref = run_stage(store, _spec(3), _build)
    assert store.lookup("demo", ref.key) is not None
    local = store.local_path(ref)
    assert (local / "a.txt").read_text() == "hello"
    assert (local / "sub" / "b.bin").stat().st_size == 100
    assert [m["key"] for m in store.manifests()] == [ref.key]
    again = run_stage(store, _spec(3), lambda out: pytest.fail("must not rebuild"))
    assert again.reused


def test_memory_store_manifest_is_written_last(tmp_path: Path) -> None:
    store = ArtifactStore("memory://fasttrack-order", cache_dir=tmp_path / "c")
    writes: list[str] = []
    original = store.fs.pipe_file
    put = store.fs.put_file

    def record_put(lpath, rpath, *a, **k):
        writes.append(rpath)
        return put(lpath, rpath, *a, **k)

    def record_pipe(path, value, *a, **k):
        writes.append(path)
        return original(path, value, *a, **k)

    store.fs.put_file, store.fs.pipe_file = record_put, record_pipe
    try:
        run_stage(store, _spec(9), _build)
    finally:
        store.fs.put_file, store.fs.pipe_file = put, original
    assert writes[-1].endswith("manifest.json") and len(writes) == 3


@pytest.mark.parametrize(
    "stage,key",
    [
        ("../etc", "a" * 64),
        ("demo", "../../x"),
        ("tmp", "a" * 64),
        ("demo", "A" * 64),
        ("Demo", "a" * 64),
    ],
)
def test_paths_cannot_escape_the_store(tmp_path: Path, stage: str, key: str) -> None:
    with pytest.raises(StoreError):
        ArtifactStore(tmp_path).uri(stage, key)


def test_clean_tmp_removes_litter_of_dead_processes(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "s")
    tmp = tmp_path / "s" / "tmp"
    dead = tmp / f"{socket.gethostname()}--999999--demo-abc-1234"
    alive = tmp / f"{socket.gethostname()}--{os.getpid()}--demo-abc-5678"
    for d in (dead, alive):
        d.mkdir(parents=True)
    assert store.clean_tmp() == 1
    assert not dead.exists() and alive.exists()
    shutil.rmtree(alive)


def test_clean_tmp_skips_entries_that_vanish_while_it_scans(tmp_path: Path, monkeypatch) -> None:
    """A concurrent stage of the same run publishes (renames away) its staging dir between
    the directory listing and the age check: the scan goes on (CI caught this race)."""
    store = ArtifactStore(tmp_path / "s")
    tmp = tmp_path / "s" / "tmp"
    dead = tmp / f"{socket.gethostname()}--999999--demo-abc-1234"
    dead.mkdir(parents=True)
    gone = tmp / f"{socket.gethostname()}--{os.getpid()}--rag-abc-5678"  # listed, then renamed
    listing = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: iter([gone, *listing(self)]))
    assert store.clean_tmp() == 1
    assert not dead.exists()
