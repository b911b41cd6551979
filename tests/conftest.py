"""Shared fixtures: tiny configs in temp stores, one Prefect test harness per session."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests (and the CLI processes they spawn) keep a per-process ephemeral API: a background server
# would outlive the session. tests/e2e/test_prefect_server.py tests the background server itself.
os.environ.setdefault("FASTTRACK_PREFECT_SERVER", "ephemeral")

from fasttrack.core.config import RunConfig
from fasttrack.core.config_loader import load_config  # noqa: E402

_TINY_TRAIN = {
    "per_device_batch_size": 8,
    "learning_rate": 5e-3,
    "logging_steps": 5,
    "eval_steps": 10,
    "save_steps": 10,
    "eval_max_rows": 16,
}


def tiny_config_dict(store: Path, **sections: Any) -> dict[str, Any]:
    """A config that trains in seconds: 30 corpus docs, 1-layer 32-dim Llama, 40 steps."""
    cfg: dict[str, Any] = {
        "name": "test-tiny",
        "seed": 7,
        "store": str(store),
        "model": {
            "name_or_path": "scratch",
            "tokenizer": {"vocab_size": 512, "min_frequency": 2},
            "architecture": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 128,
            },
        },
        "data": {
            "sources": [
                {"path": "demo:pydoc_topics", "format": "text", "max_rows": 30},
                {"path": "demo:stdlib_qa", "format": "alpaca", "max_rows": 60},
                {"path": "demo:stdlib_preference", "format": "preference", "max_rows": 60},
            ],
            "split": {"validation": 0.1, "test": 0.1, "seed": 1},
        },
        "pretrain": {
            "block_size": 64,
            "max_steps": 40,
            "per_device_batch_size": 8,
            "learning_rate": 1e-2,
            "logging_steps": 5,
            "eval_steps": 20,
            "save_steps": 20,
            "eval_max_blocks": 8,
        },
        "sft": {**_TINY_TRAIN, "max_steps": 20, "max_length": 128},
        "dpo": {**_TINY_TRAIN, "max_steps": 15, "max_length": 128},
        "evaluate": {
            "perplexity": {"max_length": 64, "stride": 32, "max_tokens": 3000},
            "answers": {"max_rows": 16, "max_length": 128},
        },
        # torch: the ONNX export (~20 s) would be paid once per test store; the ONNX backends
        # have their own tests (tests/unit/test_rag_backend.py, one export per session)
        "rag": {"embedder_backend": "torch"},
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(name), dict):
            cfg[name] = {**cfg[name], **value}
        else:
            cfg[name] = value
    return cfg


def alias_bomb(levels: int) -> str:
    """A "billion laughs" config: each level is a list of nine aliases of the one before."""
    lines = ["name: x", 'l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture
def tiny_cfg_path(tmp_path: Path) -> Path:
    return write_config(tmp_path / "tiny.yaml", tiny_config_dict(tmp_path / "store"))


@pytest.fixture
def tiny_cfg(tiny_cfg_path: Path) -> RunConfig:
    return load_config(tiny_cfg_path)


def make_tiny_model(path: Path) -> Path:
    """Write a tiny local model dir (safetensors, tokenizer, chat template) to `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fasttrack.lib.models import CHAT_TEMPLATE, build_tokenizer

    tok = build_tokenizer(["one two three four five six"] * 20, 300, 1, CHAT_TEMPLATE)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                    max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    )  # fmt: skip
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny local model dir, as a user would point `model.name_or_path` at; tests copy it
    before breaking it."""
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory):
    """One ephemeral Prefect API (SQLite in a temp PREFECT_HOME) for all tests that need it."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):  # a loaded 2-core CI box is slow
        yield


@pytest.fixture(scope="session")
def moto_endpoint() -> Any:
    """An S3-compatible server (moto) on a free loopback port, for the whole session."""
    server_mod = pytest.importorskip("moto.server", reason="needs the s3 extra (moto[server])")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "fasttrack-test",
    "AWS_SECRET_ACCESS_KEY": "fasttrack-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never ask an instance-metadata address
}


@pytest.fixture
def s3_url(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """A fresh bucket on the moto server; credentials and endpoint in the environment, as a
    worker would have them (child processes inherit them)."""
    import uuid

    import fsspec

    for name, value in {**S3_TEST_ENV, "AWS_ENDPOINT_URL": moto_endpoint}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    # fsspec reuses S3 clients across tests; one built under another test's environment (say,
    # without credentials) would keep failing.
    fsspec.get_filesystem_class("s3").clear_instance_cache()
    bucket = f"fasttrack-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3", use_listings_cache=False).mkdir(bucket)
    return f"s3://{bucket}/artifacts"


@contextmanager
def disk_full_on_publish() -> Iterator[None]:
    """ENOSPC from the fsync that flushes a manifest being published (`<store>/tmp/pub-*`), as
    a full disk reports it; every other fsync works. Restored on exit."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if "/tmp/pub-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    os.fsync = fsync
    try:
        yield
    finally:
        os.fsync = real


def training_children(root: Any = None) -> list[Any]:
    """Training children under `root` (default: this process): a fresh `python -m
    fasttrack.core.isolation` interpreter, or a child forked from the zygote (same command line
    as the zygote `python -m fasttrack.core.forkserver`, whose child it is)."""
    import psutil

    found = []
    for proc in (root or psutil.Process()).children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
            parent = proc.parent()
            forked = parent is not None and "fasttrack.core.forkserver" in " ".join(
                parent.cmdline()
            )
            if "fasttrack.core.isolation" in cmd or ("fasttrack.core.forkserver" in cmd and forked):
                found.append(proc)
        except psutil.Error:
            continue
    return found
