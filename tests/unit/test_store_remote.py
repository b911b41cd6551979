"""The `store` config section and the object-store helpers that need no server."""

from pathlib import Path

import pytest

from fasttrack.core import store_remote
from fasttrack.core.config_loader import load_config
from fasttrack.core.errors import ConfigError, StoreError
from fasttrack.core.stage import BuildResult, StageSpec, run_stage
from fasttrack.core.store import ArtifactStore
from tests.e2e.storecheck import orphans

BASE = "data:\n  sources:\n    - {path: 'demo:pydoc_topics', format: text}\n"


def _cfg(tmp_path: Path, store: str) -> Path:
    path = tmp_path / "x.yaml"
    path.write_text(f"store: {store}\n{BASE}")
    return path


def test_store_shorthand_mapping_and_overrides(tmp_path: Path) -> None:
    assert str(load_config(_cfg(tmp_path, "artifacts")).store) == "artifacts"
    cfg = load_config(
        _cfg(tmp_path, "artifacts"),
        ["store.url=s3://bucket/team", "store.credentials_block=aws-credentials/prod"],
    )
    assert (cfg.store.url, cfg.store.credentials_block) == (
        "s3://bucket/team",
        "aws-credentials/prod",
    )
    mapping = "{url: 's3://b/p', credentials_block: secret/opts}"
    assert load_config(_cfg(tmp_path, mapping)).store.credentials_block == "secret/opts"
    assert load_config(_cfg(tmp_path, "x"), ["store=s3://other/p"]).store.url == "s3://other/p"


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "store.url=nope://x",
            "x.yaml: --set store.url=nope://x: store.url: unknown fsspec protocol",
        ),
        ("store.url=s3://", "store.url: 's3://' names no bucket"),
        ("store.url=gs://b/p", "store.url: gs:// needs a package that is not installed"),
        ("store.credentials_block=no slash", "store.credentials_block: String should match"),
        ("store.bucket=x", "store.bucket: unknown key (allowed: credentials_block, url)"),
    ],
)
def test_bad_store_config_names_the_field(tmp_path: Path, override: str, message: str) -> None:
    if "gs://" in override and store_remote.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(ConfigError) as info:
        load_config(_cfg(tmp_path, "artifacts"), [override])
    assert message in str(info.value)


def test_manifest_cannot_point_files_outside_its_artifact() -> None:
    base = "bucket/root/demo/" + "a" * 64
    assert store_remote.files_dir(base, {}) == base
    assert store_remote.files_dir(base, {"objects": "objects/h-1-ab"}) == f"{base}/objects/h-1-ab"
    for bad in ("../../other", "objects/../x", "objects/a/b", 3):
        with pytest.raises(StoreError, match="invalid objects prefix"):
            store_remote.files_dir(base, {"objects": bad})


def test_object_store_without_rename_publishes_under_a_writer_prefix(tmp_path: Path) -> None:
    store = ArtifactStore("memory://fasttrack-prefix", cache_dir=tmp_path / "c")
    spec = StageSpec(stage="demo", version="1", config={"n": 1})

    def build(out: Path) -> BuildResult:
        (out / "a.txt").write_text("hello")
        return BuildResult()

    ref = run_stage(store, spec, build)
    manifest = store.read_manifest("demo", ref.key)
    assert manifest["objects"].startswith("objects/")
    assert store.fs.cat_file(f"{store.files_dir('demo', ref.key, manifest)}/a.txt") == b"hello"
    assert orphans(store, "demo", ref.key) == []
    assert (store.local_path(ref) / "a.txt").read_text() == "hello"
