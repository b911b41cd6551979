"""`fasttrack serve --engine vllm` on CUDA: the merged export of a tiny trained run served by
vLLM behind the same routes, called with the official `openai` client. Skipped without CUDA
and vllm (the error path without them is a case of tests/e2e/bad_inputs.py)."""

from __future__ import annotations

import importlib.util
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch

from fasttrack.core.compute import free_port
from flows.pipeline import PipelineParams, pipeline
from tests.conftest import tiny_config_dict, write_config
from tests.e2e.test_serve import _wait_healthy
from tests.e2e.test_server import start, stop

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.gpu,
    pytest.mark.usefixtures("prefect_harness"),
    pytest.mark.skipif(
        not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None,
        reason="needs CUDA and the vllm package",
    ),
]
MODEL = "test-tiny-pretrain"


def test_vllm_engine_serves_the_merged_export(tmp_path: Path) -> None:
    d = tiny_config_dict(tmp_path / "store", rag={"enabled": False})
    d["generation"] = {"max_new_tokens": 12}
    path = write_config(tmp_path / "c.yaml", d)
    pipeline(PipelineParams(config=str(path), stages=["data", "pretrain"]))
    port, log = free_port(), tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "flows.cli", "serve", str(path), "--port", str(port),
           "--model", "pretrain", "--no-rag", "--engine", "vllm"]  # fmt: skip
    proc = start(cmd, {**os.environ, "HF_HUB_OFFLINE": "1"}, log)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        assert client.models.list().data[0].id == MODEL

        def chat(q: str) -> str:
            out = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": q}], temperature=0
            )
            assert out.choices[0].finish_reason in ("stop", "length")
            assert 0 < out.usage.completion_tokens <= 12
            return out.choices[0].message.content

        questions = [f"What is module {i}?" for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(chat, questions))
        assert answers == [chat(q) for q in questions]  # greedy: the same alone or together
        raw = {"model": MODEL, "prompt": "The json module", "max_tokens": 5, "temperature": 0}
        chunks = list(client.completions.create(**raw, stream=True))
        plain = client.completions.create(**raw)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
            )
    finally:
        stop(proc)
