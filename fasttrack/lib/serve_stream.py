"""Server-sent events for `stream: true` on /v1/chat/completions and /v1/completions.

Both routes stream the same way: the batcher calls each request's `on_delta` from its worker
thread with settled new text; those pieces go out as chunks in the route's OpenAI shape
(`chat.completion.chunk` with `delta`, or `text_completion` with `text`), then one chunk per
choice with its `finish_reason`, the RAG sources (chat), and `data: [DONE]`. A client that
hangs up cancels its rows, which leave the running batch at their next token.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

from fastapi.responses import StreamingResponse

from fasttrack.lib.batcher import Batcher, Busy
from fasttrack.lib.batcher import Request as GenRequest

# (choice index, new text or None, finish_reason or None) -> one choice of a chunk
Piece = Callable[[int, str | None, str | None], dict[str, Any]]


def chat_piece(i: int, text: str | None, finish: str | None) -> dict[str, Any]:
    delta = {} if finish else {"content": text}
    return {"index": i, "delta": delta, "finish_reason": finish}


def chat_opening(i: int, text: str | None, finish: str | None) -> dict[str, Any]:
    return {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}


def completion_piece(i: int, text: str | None, finish: str | None) -> dict[str, Any]:
    return {"index": i, "text": text or "", "finish_reason": finish, "logprobs": None}


def submit_streamed(
    batcher: Batcher, reqs: list[GenRequest], loop: asyncio.AbstractEventLoop
) -> tuple[list[Future], asyncio.Queue]:
    """Submit `reqs` with their deltas (choice indices numbered across them) going to a queue;
    each finished request puts None. Busy: the ones already submitted are cancelled."""
    events: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()
    futures: list[Future] = []
    base = 0
    for req in reqs:
        req.on_delta = lambda i, text, b=base: loop.call_soon_threadsafe(
            events.put_nowait, (b + i, text)
        )
        base += req.n
        try:
            fut = batcher.submit(req)
        except Busy:
            for r in reqs:
                r.cancelled.set()
            raise
        fut.add_done_callback(lambda _: loop.call_soon_threadsafe(events.put_nowait, None))
        futures.append(fut)
    return futures, events


def sse(
    batcher: Batcher,
    reqs: list[GenRequest],
    head: dict[str, Any],
    piece: Piece,
    opening: Piece | None = None,
    sources: list | None = None,
) -> StreamingResponse:
    """The streamed answer to `reqs` (raises Busy before anything is sent)."""
    futures, events = submit_streamed(batcher, reqs, asyncio.get_running_loop())
    total = sum(r.n for r in reqs)

    def event(choices: list[dict], **extra: Any) -> str:
        return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

    async def events_out() -> AsyncIterator[str]:
        try:
            if opening is not None:
                for i in range(total):
                    yield event([opening(i, "", None)])
            finished = 0
            while finished < len(futures):
                item = await events.get()
                if item is None:
                    finished += 1
                else:
                    yield event([piece(item[0], item[1], None)])
            try:
                done = [c for fut in futures for c in fut.result()]
            except Exception as exc:  # noqa: BLE001 - reported in the stream, not a 500
                err = {
                    "message": f"generation failed: {type(exc).__name__}",
                    "type": "server_error",
                    "param": None,
                    "code": "generation_failed",
                }
                yield f"data: {json.dumps({'error': err})}\n\n"
                return
            for i, c in enumerate(done):
                yield event([piece(i, None, c.finish_reason)])
            if sources is not None:
                yield event([], sources=sources)
            yield "data: [DONE]\n\n"
        finally:
            for req in reqs:
                req.cancelled.set()  # a client that went away frees its rows

    return StreamingResponse(events_out(), media_type="text/event-stream")
