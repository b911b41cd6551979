"""`fasttrack ask --server URL`: the question goes to a running `fasttrack serve` (RAG mode), so
nothing is loaded here; the answer and its sources print as a local `ask` prints them."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from fasttrack.core.errors import FastTrackError
from fasttrack.lib.answer import Answer


def ask_server(url: str, question: str, api_key: str | None = None) -> Answer:
    import httpx

    if not question.strip():
        raise FastTrackError("ask: the question is empty")
    base = url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=600) as client:
            models = _json(client.get("/v1/models"), url)
            model = models["data"][0]["id"]
            body = {"model": model, "messages": [{"role": "user", "content": question}],
                    "rag": True}  # fmt: skip
            out = _json(client.post("/v1/chat/completions", json=body), url)
    except httpx.HTTPError as exc:
        raise FastTrackError(f"ask --server {url}: {exc}") from None
    hits = [SimpleNamespace(**s) for s in out.get("sources") or []]
    stage = model.rsplit("-", 1)[-1]
    text = out["choices"][0]["message"]["content"]
    return Answer(text=text, hits=hits, mode="server", model_stage=stage, model_key=model, notes=[])


def _json(response: Any, url: str) -> Any:
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise FastTrackError(f"ask --server {url}: {response.status_code}: {message}")
    return response.json()
