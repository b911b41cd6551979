"""The OpenAI-compatible HTTP API of `fasttrack serve` (FastAPI; uvicorn runs it).

Routes: GET /health, GET /v1/models, POST /v1/chat/completions and POST /v1/completions (both
also `stream: true`: server-sent events ending with `data: [DONE]`, see `serve_stream`),
POST /v1/embeddings (the RAG embedder).
Generation goes through the shared `Batcher`; chat prompts through the model's chat template,
as in evaluation and `ask`. In RAG mode the last user message is answered from the run's index
with `ask`'s cited-context prompt, and the hits come back in the extra top-level field `sources`
(streaming: one last event before [DONE] with empty `choices` and `sources`).

Every error is OpenAI-shaped (`{"error": {"message", "type", "param", "code"}}`) with 400, 401,
404, 413, 422 or 429; prompts and keys are never logged (uvicorn's access log has paths only).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from fasttrack.core.config import RunConfig
from fasttrack.core.config_eval import GenerationConfig
from fasttrack.lib.batcher import Batcher, Busy, Completion
from fasttrack.lib.batcher import Request as GenRequest
from fasttrack.lib.generate import chat_text, encode_left, prompt_room
from fasttrack.lib.serve_stream import chat_opening, chat_piece, completion_piece, sse

MAX_BODY = 1 << 20  # bytes of a request body


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None, code: str):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = (
            status, message, kind, param, code,
        )  # fmt: skip

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


def invalid(message: str, param: str | None = None, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


# ---- request bodies (unknown OpenAI fields are accepted and ignored) -------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Message(_Body):
    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text ones are meaningful here
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class _Sampling(_Body):
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False


class ChatBody(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    rag: bool | None = Field(None, description="Per request: answer from the index or not.")


class CompletionBody(_Sampling):
    prompt: str | list[str]


class EmbeddingBody(_Body):
    model: str
    input: str | list[str] = Field(min_length=1)


@dataclass
class Served:
    """Everything the routes need; built once by `fasttrack serve`."""

    cfg: RunConfig
    model_id: str
    model: Any
    tok: Any
    batcher: Batcher
    retriever: Any = None  # a Retriever in RAG mode
    api_key: str | None = None
    max_body: int = MAX_BODY
    created: int = field(default_factory=lambda: int(time.time()))
    _embedder: Any = None

    @property
    def embedder_id(self) -> str:
        return self.cfg.rag.embedder

    def embedder(self) -> Any:
        from fasttrack.core.store import ArtifactStore
        from fasttrack.lib.retrieval import Embedder

        if self.retriever is not None:
            return self.retriever.embedder
        if self._embedder is None:
            rag, store = self.cfg.rag, ArtifactStore(self.cfg.store)
            self._embedder = Embedder.load(rag.embedder, rag.embedder_backend, store)
        return self._embedder


def decoding(base: GenerationConfig, body: _Sampling, max_new: int) -> GenerationConfig:
    """The config's decoding with the request's fields: temperature 0 is greedy, any other
    temperature or a top_p samples, neither keeps the configured strategy."""
    update: dict[str, Any] = {"max_new_tokens": max_new}
    if body.temperature == 0:
        update["strategy"] = "greedy"
    elif body.temperature is not None or body.top_p is not None:
        update["strategy"] = "sample"
        if body.temperature is not None:
            update["temperature"] = body.temperature
        if body.top_p is not None:
            update["top_p"] = body.top_p
    return base.model_copy(update=update)


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON; 413 past `limit` bytes, 400 if not JSON. The rest of an oversized
    body is read and dropped, so the client gets the 413 instead of a reset connection."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise ApiError(413, f"request body of {size} bytes is over the limit of {limit}",
                       "invalid_request_error", None, "request_too_large")  # fmt: skip
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid(f"the body is not valid JSON: {exc}", code="invalid_json") from None


def parse(model: type[_Body], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(422, f"{param}: {first['msg']}", "invalid_request_error", param,
                       "invalid_value") from None  # fmt: skip


def create_app(served: Served) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        served.batcher.start()
        yield
        await run_in_threadpool(served.batcher.stop)  # after uvicorn drained the requests

    app = FastAPI(title="fasttrack serve", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(404)
    async def _not_found(request: Request, _: Exception) -> JSONResponse:
        msg = f"no route {request.method} {request.url.path}"
        return ApiError(404, msg, "invalid_request_error", None, "unknown_url").response()

    @app.exception_handler(405)
    async def _bad_method(request: Request, _: Exception) -> JSONResponse:
        msg = f"{request.method} is not allowed on {request.url.path}"
        return ApiError(405, msg, "invalid_request_error", None, "method_not_allowed").response()

    def auth(request: Request) -> None:
        if served.api_key:
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(token.encode(), served.api_key.encode()):
                raise ApiError(401, "invalid or missing API key", "invalid_request_error",
                               None, "invalid_api_key")  # fmt: skip

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(auth)])

    def check_model(name: str, allowed: str) -> None:
        if name != allowed:
            raise ApiError(404, f"model {name!r} is not served here (this server: {allowed!r})",
                           "invalid_request_error", "model", "model_not_found")  # fmt: skip

    @app.get("/health")
    async def health() -> dict[str, Any]:
        b = served.batcher
        return {"status": "ok", "model": served.model_id, "in_flight": b.in_flight,
                "largest_batch": max(b.batches, default=0)}  # fmt: skip

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        owned = {"object": "model", "created": served.created, "owned_by": "fasttrack"}
        ids = [served.model_id, served.embedder_id]
        return {"object": "list", "data": [{"id": i, **owned} for i in ids]}

    def budget(body: _Sampling, explicit: int | None, prompt_len: int, keep_end: bool) -> int:
        """max_tokens checked against the context; 400 if the prompt cannot fit."""
        from fasttrack.lib.models import max_positions

        limit = max_positions(served.model)
        max_new = explicit or served.cfg.generation.max_new_tokens
        if limit and explicit and explicit >= limit:
            raise invalid(f"max_tokens {explicit} leaves no room for a prompt in the model's "
                          f"context of {limit} tokens", "max_tokens",
                          "context_length_exceeded")  # fmt: skip
        if limit and not keep_end and prompt_len + max_new > limit:
            raise invalid(f"the prompt has {prompt_len} tokens; with max_tokens {max_new} that "
                          f"is over the model's context of {limit} tokens", "messages",
                          "context_length_exceeded")  # fmt: skip
        return max_new

    def gen_request(ids: list[int], g: GenerationConfig, body: _Sampling) -> GenRequest:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return GenRequest(ids=ids, g=g, stop=stop, n=body.n, seed=body.seed)

    async def run(req: GenRequest, engine: Any = None) -> list[Completion]:
        try:
            fut = (engine or served.batcher).submit(req)
        except Busy as exc:
            raise ApiError(429, str(exc), "rate_limit_error", None, "server_busy") from None
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            req.cancelled.set()
            raise

    def usage(prompt: int, completions: list[Completion]) -> dict[str, int]:
        out = sum(c.tokens for c in completions)
        return {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out}

    @v1.post("/chat/completions")
    async def chat(request: Request) -> Any:
        body: ChatBody = parse(ChatBody, await read_json(request, served.max_body))
        check_model(body.model, served.model_id)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        use_rag = served.retriever is not None and body.rag is not False
        if body.rag and served.retriever is None:
            raise invalid("this server has no RAG index (started with --no-rag)", "rag")
        hits: list[Any] = []
        explicit = body.max_completion_tokens or body.max_tokens
        if use_rag:
            from fasttrack.lib.ask import rag_prompt

            users = [m for m in messages if m["role"] == "user" and m["content"].strip()]
            if not users:
                raise invalid("RAG mode needs a user message to answer", "messages")
            room = prompt_room(served.model, budget(body, explicit, 0, keep_end=True))
            prompt, hits = await run_in_threadpool(
                rag_prompt, served.retriever, users[-1]["content"], None, None, served.tok, room
            )
            users[-1]["content"] = prompt
        try:
            text = chat_text(served.tok, messages)
        except Exception as exc:  # the template rejects the conversation (jinja raise_exception)
            raise invalid(f"messages: the chat template refused them: {exc}", "messages") from None
        if use_rag:  # ask's prompt, cut on the left exactly as ask cuts it
            max_new = budget(body, explicit, 0, keep_end=True)
            room = prompt_room(served.model, max_new)
            ids = encode_left(served.tok, [text], room)["input_ids"][0].tolist()
        else:
            ids = served.tok(text, add_special_tokens=False)["input_ids"]
            max_new = budget(body, explicit, len(ids), keep_end=False)
        req = gen_request(ids, decoding(served.cfg.generation, body, max_new), body)
        sources = [source(h) for h in hits] if use_rag else None
        engine = None  # rag.answer=quote: ask's quoted sentence instead of generated text
        if use_rag and served.cfg.rag.answer == "quote":
            from fasttrack.lib.serve_quote import QuoteEngine

            engine = QuoteEngine(served.model, served.tok, prompt, hits, room)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            head = {"id": rid, "object": "chat.completion.chunk", "created": created,
                    "model": served.model_id}  # fmt: skip
            return stream([req], head, engine, piece=chat_piece, opening=chat_opening,
                          sources=sources)  # fmt: skip
        done = await run(req, engine)
        choices = [
            {"index": i, "message": {"role": "assistant", "content": c.text},
             "finish_reason": c.finish_reason, "logprobs": None}
            for i, c in enumerate(done)
        ]  # fmt: skip
        out = {"id": rid, "object": "chat.completion", "created": created,
               "model": served.model_id, "choices": choices,
               "usage": usage(len(ids), done)}  # fmt: skip
        if sources is not None:
            out["sources"] = sources
        return out

    def stream(reqs: list[GenRequest], head: dict[str, Any], engine: Any = None, **kw: Any) -> Any:
        try:
            return sse(engine or served.batcher, reqs, head, **kw)
        except Busy as exc:
            raise ApiError(429, str(exc), "rate_limit_error", None, "server_busy") from None

    @v1.post("/completions")
    async def completions(request: Request) -> Any:
        body: CompletionBody = parse(CompletionBody, await read_json(request, served.max_body))
        check_model(body.model, served.model_id)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise invalid("prompt: give at least one prompt", "prompt")
        reqs = []
        for p in prompts:
            ids = served.tok(p)["input_ids"]
            max_new = budget(body, body.max_tokens, len(ids), keep_end=False)
            reqs.append(
                (len(ids), gen_request(ids, decoding(served.cfg.generation, body, max_new), body))
            )
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            head = {"id": rid, "object": "text_completion", "created": created,
                    "model": served.model_id}  # fmt: skip
            return stream([r for _, r in reqs], head, piece=completion_piece)
        results = await asyncio.gather(*(run(r) for _, r in reqs))
        choices, all_done = [], []
        for done in results:
            for c in done:
                choices.append({"index": len(choices), "text": c.text,
                                "finish_reason": c.finish_reason, "logprobs": None})  # fmt: skip
                all_done.append(c)
        return {"id": rid, "object": "text_completion",
                "created": created, "model": served.model_id, "choices": choices,
                "usage": usage(sum(n for n, _ in reqs), all_done)}  # fmt: skip

    @v1.post("/embeddings")
    async def embeddings(request: Request) -> Any:
        body: EmbeddingBody = parse(EmbeddingBody, await read_json(request, served.max_body))
        check_model(body.model, served.embedder_id)
        texts = [body.input] if isinstance(body.input, str) else body.input
        embedder = await run_in_threadpool(served.embedder)
        vectors = await run_in_threadpool(embedder.encode, texts)
        tokens = sum(len(ids) for ids in embedder.tokenizer(texts)["input_ids"])
        data = [{"object": "embedding", "index": i, "embedding": v.tolist()}
                for i, v in enumerate(vectors)]  # fmt: skip
        return {"object": "list", "data": data, "model": served.embedder_id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip

    app.include_router(v1)
    return app


def source(hit: Any) -> dict[str, Any]:
    """A retrieved chunk as the `sources` field shows it ([n] in the answer = rank n)."""
    return {"rank": hit.rank, "title": hit.title, "section": hit.section,
            "doc_id": hit.doc_id, "chunk_id": hit.chunk_id, "score": hit.score}  # fmt: skip
