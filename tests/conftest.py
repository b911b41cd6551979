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

from tasks.config import RunConfig, load_config  # noqa: E402

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
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(name), dict):
            cfg[name] = {**cfg[name], **value}
        else:
            cfg[name] = value
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture
def tiny_cfg_path(tmp_path: Path) -> Path:
    return write_config(tmp_path / "tiny.yaml", tiny_config_dict(tmp_path / "store"))


@pytest.fixture
def tiny_cfg(tiny_cfg_path: Path) -> RunConfig:
    return load_config(tiny_cfg_path)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory):
    """One ephemeral Prefect API (SQLite in a temp PREFECT_HOME) for all tests that need it."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


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
