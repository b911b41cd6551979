"""The artifact store on S3 (a moto server on loopback, reached through s3fs like real S3/MinIO).

Writers run in separate processes with separate local caches, as workers on different hosts
would: the host-local lock does not serialise them, so only the store's own protocol (writer
prefixes + a conditionally created manifest) keeps artifacts whole.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import fsspec
import pytest
from prefect import flow, task

from fasttrack.core import store_remote
from fasttrack.core.config import StoreConfig
from fasttrack.core.errors import StoreError
from fasttrack.core.stage import BuildResult, StageSpec, run_stage
from fasttrack.core.store import MANIFEST, ArtifactRef, ArtifactStore
from tests.conftest import S3_TEST_ENV, tiny_config_dict, write_config
from tests.e2e.storecheck import orphans

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
SPAWN = mp.get_context("spawn")


def _spec(n: int) -> StageSpec:
    return StageSpec(stage="demo", version="1", config={"n": n})


def _write(out: Path, tag: str, names: list[str]) -> BuildResult:
    for name in names:
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{tag}:{name}\n" * (50 + len(tag)))
    return BuildResult(metrics={"tag": tag})


def _key_dir(store: ArtifactStore, key: str) -> str:
    return f"{store.root}/demo/{key}"


def _run(target, *args) -> int:
    proc = SPAWN.Process(target=target, args=args)
    proc.start()
    proc.join(180)
    return proc.exitcode


def test_publish_lookup_fetch_and_force_on_s3(s3_url: str, tmp_path: Path) -> None:
    store = ArtifactStore(s3_url, cache_dir=tmp_path / "cache")
    ref = run_stage(store, _spec(1), lambda out: _write(out, "one", ["a.txt", "sub/b.txt"]))
    assert not ref.reused and ref.uri == f"{s3_url}/demo/{ref.key}"
    base = _key_dir(store, ref.key)
    assert sorted(store.fs.ls(base, detail=False)) == [f"{base}/{MANIFEST}", f"{base}/objects"]
    files = store.files_dir("demo", ref.key, store.read_manifest("demo", ref.key))
    assert sorted(store.fs.find(files)) == [f"{files}/a.txt", f"{files}/sub/b.txt"]
    assert store.verify("demo", ref.key) == []
    assert [m["key"] for m in store.manifests()] == [ref.key]
    local = store.local_path(ref)
    assert (local / "sub" / "b.txt").read_text().startswith("one:sub/b.txt")

    # Forced rebuild: the new version replaces the old files, and a worker's stale local copy
    # is refetched instead of being served.
    forced = run_stage(store, _spec(1), lambda out: _write(out, "two", ["a.txt"]), force=True)
    assert not forced.reused and forced.metrics == {"tag": "two"}
    assert not store.fs.exists(files)
    assert store.verify("demo", ref.key) == []
    assert sorted(p.name for p in store.local_path(forced).iterdir()) == ["a.txt", MANIFEST]
    assert (store.local_path(forced) / "a.txt").read_text().startswith("two:")


def test_manifest_create_is_conditional_on_the_server(s3_url: str, tmp_path: Path) -> None:
    """The server itself refuses the second create (If-None-Match: *), not a client-side check."""
    store = ArtifactStore(s3_url, cache_dir=tmp_path / "cache")
    path = f"{store.root}/demo/{'0' * 64}/{MANIFEST}"
    assert store_remote.create_manifest(store.fs, path, b"first")
    store.fs.exists = lambda *a, **k: False  # a client-side emulation would now overwrite
    assert not store_remote.create_manifest(store.fs, path, b"second")
    del store.fs.exists
    assert store.fs.cat_file(path) == b"first"


def test_reader_sees_nothing_until_the_manifest_exists(
    s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = ArtifactStore(s3_url, cache_dir=tmp_path / "writer")
    reader = ArtifactStore(s3_url, cache_dir=tmp_path / "reader")
    uploaded, release = threading.Event(), threading.Event()
    create = store_remote.create_manifest

    def paused(fs, path: str, payload: bytes) -> bool:
        uploaded.set()
        release.wait(120)
        return create(fs, path, payload)

    monkeypatch.setattr(store_remote, "create_manifest", paused)
    spec, result = _spec(2), {}
    build = lambda out: _write(out, "w", ["a.txt", "b.txt"])  # noqa: E731
    thread = threading.Thread(target=lambda: result.update(ref=run_stage(writer, spec, build)))
    thread.start()
    try:
        assert uploaded.wait(120)
        assert len(reader.fs.find(_key_dir(reader, spec.key))) == 2  # every file is uploaded...
        assert reader.lookup("demo", spec.key) is None  # ...and still nothing is visible
        assert reader.manifests() == []
        with pytest.raises(StoreError, match="not found"):
            reader.local_path(ArtifactRef(stage="demo", key=spec.key, uri=""))
    finally:
        release.set()
        thread.join(120)
    found = reader.lookup("demo", spec.key)
    assert found is not None and found.key == result["ref"].key and not result["ref"].reused


def _killed_writer(url: str, cache: str) -> None:
    """Upload one of three files, then die by SIGKILL (no cleanup, no manifest)."""
    real_upload = store_remote.upload

    def upload_then_die(fs, src: Path, prefix: str, paths: list[str]) -> None:
        real_upload(fs, src, prefix, paths[:1])
        os.kill(os.getpid(), signal.SIGKILL)

    store_remote.upload = upload_then_die
    build = lambda out: _write(out, "dead", ["a.txt", "b.txt", "c.txt"])  # noqa: E731
    run_stage(ArtifactStore(url, cache_dir=cache), _spec(3), build)


def test_writer_killed_mid_upload_leaves_nothing_complete(s3_url: str, tmp_path: Path) -> None:
    assert _run(_killed_writer, s3_url, str(tmp_path / "dead")) == -signal.SIGKILL
    store = ArtifactStore(s3_url, cache_dir=tmp_path / "next")
    key = _spec(3).key
    assert len(store.fs.find(_key_dir(store, key))) == 1  # the dead writer's upload is there
    assert store.read_manifest("demo", key) is None and store.lookup("demo", key) is None
    [litter] = orphans(store, "demo", key)

    ref = run_stage(store, _spec(3), lambda out: _write(out, "live", ["a.txt", "b.txt"]))
    assert not ref.reused and store.verify("demo", key) == []
    assert orphans(store, "demo", key) == [litter]  # litter for gc, never read
    assert all(
        (store.local_path(ref) / n).read_text().startswith("live:") for n in ("a.txt", "b.txt")
    )


def _racer(url: str, cache: str, tag: str, names: list[str], barrier, results) -> None:
    """Build and publish key _spec(4); both racers try to create the manifest at once."""
    create = store_remote.create_manifest

    def together(fs, path: str, payload: bytes) -> bool:
        barrier.wait(120)  # both have uploaded every file: now both claim the key
        return create(fs, path, payload)

    store_remote.create_manifest = together
    ref = run_stage(ArtifactStore(url, cache_dir=cache), _spec(4), lambda o: _write(o, tag, names))
    results.put((tag, ref.reused, ref.metrics["tag"]))


def test_concurrent_publish_of_one_key_has_one_whole_winner(s3_url: str, tmp_path: Path) -> None:
    names = {"A": ["shared.txt", "a_only.txt", "sub/x.txt"], "B": ["shared.txt", "b_only.txt"]}
    barrier, results = SPAWN.Barrier(2), SPAWN.Queue()
    procs = [
        SPAWN.Process(
            target=_racer, args=(s3_url, str(tmp_path / tag), tag, names[tag], barrier, results)
        )
        for tag in names
    ]
    for proc in procs:
        proc.start()
    outcomes = sorted(results.get(timeout=180) for _ in procs)
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    winners = [tag for tag, reused, _ in outcomes if not reused]
    assert len(winners) == 1  # exactly one manifest was created
    winner = winners[0]
    assert all(seen == winner for _, _, seen in outcomes)  # the loser got the winner's ref

    store = ArtifactStore(s3_url, cache_dir=tmp_path / "reader")
    key = _spec(4).key
    manifest = store.read_manifest("demo", key)
    assert sorted(f["path"] for f in manifest["files"]) == sorted(names[winner])
    files = store.files_dir("demo", key, manifest)
    expected = sorted(
        [f"{files}/{n}" for n in names[winner]] + [f"{_key_dir(store, key)}/{MANIFEST}"]
    )
    assert sorted(store.fs.find(_key_dir(store, key))) == expected  # the loser cleaned up
    assert store.verify("demo", key) == []
    local = store.local_path(store.lookup("demo", key))
    assert all((local / n).read_text().startswith(f"{winner}:") for n in names[winner])


def _worker(url: str, cache: str, marker: str, results) -> None:
    def build(out: Path) -> BuildResult:
        with open(marker, "a") as f:
            f.write(f"{os.getpid()}\n")
        return _write(out, f"pid{os.getpid()}", ["model.bin"])

    store = ArtifactStore(url, cache_dir=cache)
    ref = run_stage(store, _spec(5), build)
    results.put((ref.reused, (store.local_path(ref) / "model.bin").read_text()))


def test_second_worker_reuses_the_first_workers_artifact(s3_url: str, tmp_path: Path) -> None:
    marker, results = tmp_path / "built.txt", SPAWN.Queue()
    for worker in ("w1", "w2"):
        assert _run(_worker, s3_url, str(tmp_path / worker), str(marker), results) == 0
    (reused1, text1), (reused2, text2) = results.get(timeout=10), results.get(timeout=10)
    assert len(marker.read_text().split()) == 1  # built once, by the first worker
    assert (reused1, reused2) == (False, True) and text1 == text2


@task
def _publish_task(store: StoreConfig, cache: str) -> ArtifactRef:
    return run_stage(
        ArtifactStore(store, cache_dir=cache), _spec(6), lambda o: _write(o, "b", ["f"])
    )


@flow
def _worker_flow(store: StoreConfig, cache: str) -> ArtifactRef:
    return _publish_task(store, cache)


@pytest.mark.usefixtures("prefect_harness")
def test_credentials_from_prefect_blocks(
    s3_url: str, moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefect_aws = pytest.importorskip("prefect_aws")
    from botocore.exceptions import NoCredentialsError
    from prefect.blocks.system import Secret

    key, secret = S3_TEST_ENV["AWS_ACCESS_KEY_ID"], S3_TEST_ENV["AWS_SECRET_ACCESS_KEY"]
    prefect_aws.AwsCredentials(
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        aws_client_parameters={"endpoint_url": moto_endpoint},
    ).save("fasttrack-test-store", overwrite=True)
    client = {"endpoint_url": moto_endpoint, "region_name": "us-east-1"}
    Secret(value={"key": key, "secret": secret, "client_kwargs": client}).save(
        "fasttrack-test-store-options", overwrite=True
    )
    # Only the blocks know the way in: no keys in the environment, and its endpoint is a dead
    # loopback port.
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    fsspec.get_filesystem_class("s3").clear_instance_cache()  # forget env-configured clients
    with pytest.raises(NoCredentialsError):
        ArtifactStore(s3_url, cache_dir=tmp_path / "none").lookup("demo", _spec(6).key)

    aws = StoreConfig(url=s3_url, credentials_block="aws-credentials/fasttrack-test-store")
    ref = _worker_flow(aws, str(tmp_path / "a"))  # the block is loaded inside a Prefect task
    opts = StoreConfig(url=s3_url, credentials_block="secret/fasttrack-test-store-options")
    found = ArtifactStore(opts, cache_dir=tmp_path / "s").lookup("demo", ref.key)
    assert not ref.reused and found is not None and found.metrics == {"tag": "b"}

    with pytest.raises(StoreError, match="fasttrack-test-missing"):
        ArtifactStore(StoreConfig(url=s3_url, credentials_block="secret/fasttrack-test-missing"))


@pytest.mark.usefixtures("prefect_harness")
def test_pipeline_on_s3_then_a_fresh_process_executes_nothing(
    s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.pipeline import PipelineParams, pipeline

    monkeypatch.setenv("FASTTRACK_CACHE", str(tmp_path / "worker1-cache"))
    local = tmp_path / "local-store-unused"
    cfg = write_config(tmp_path / "tiny.yaml", tiny_config_dict(local))
    first = pipeline(PipelineParams(config=str(cfg), overrides=[f"store.url={s3_url}"]))
    assert len(first.executed) == 14 and first.store == s3_url
    assert not local.exists()  # everything went to the bucket
    stages = {m["stage"] for m in ArtifactStore(s3_url).manifests()}
    assert {"data", "pretrain", "sft", "dpo", "rag", "evaluate", "report"} <= stages

    # Another "worker": fresh process, fresh Prefect database, empty local cache.
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {
        "COLUMNS": "300",
        "PREFECT_HOME": str(tmp_path / "worker2-prefect"),
        "FASTTRACK_CACHE": str(tmp_path / "worker2-cache"),
    }
    cmd = [sys.executable, "-m", "flows.cli", "run", str(cfg), "--set", f"store.url={s3_url}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "0 step(s) executed" in proc.stdout, proc.stdout[-3000:]
    assert len(re.findall(r"│\s*cached\s*│", proc.stdout)) == 14  # every step reused
