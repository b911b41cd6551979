"""`fasttrack serve --engine vllm`: the same routes and errors, generation by vLLM on CUDA.

vLLM loads a plain model directory, so it serves the run's `merged` export (the CLI builds or
reuses that artifact). `VllmBatcher` has the `Batcher` interface the routes use (`start`,
`submit`, `stop`, `in_flight`, `batches`): each request goes to vLLM's `AsyncLLMEngine`, which
does its own continuous batching and paged attention, on an event loop in a thread of its own;
text deltas stream through the request's `on_delta`, a client that leaves aborts its request.
vllm is imported only here and only when asked for: it is not a dependency of this project.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from fasttrack.core.errors import FastTrackError
from fasttrack.lib.batcher import Admission, Completion, Request, cut_at_stop
from fasttrack.lib.device_info import EngineError, check_vllm  # noqa: F401  (re-exported)


def sampling_params(req: Request, stop_ids: list[int]) -> Any:
    """vLLM's SamplingParams for the request's decoding (greedy = temperature 0)."""
    from vllm import SamplingParams

    g = req.g
    if g.strategy == "beam":
        raise FastTrackError("beam search is not served by --engine vllm")
    sample = g.strategy == "sample"
    return SamplingParams(
        n=req.n,
        max_tokens=g.max_new_tokens,
        temperature=g.temperature if sample else 0.0,
        top_p=g.top_p if sample else 1.0,
        top_k=g.top_k if sample and g.top_k else -1,
        repetition_penalty=g.repetition_penalty,
        seed=req.seed,
        stop=req.stop or None,
        stop_token_ids=stop_ids,
    )


class VllmBatcher(Admission):
    """The routes' batcher, backed by vLLM's async engine (CUDA only)."""

    def __init__(self, model_dir: Path, tok: Any, max_pending: int = 256, **engine_kwargs: Any):
        from fasttrack.core.templates import stop_ids

        self.model_dir, self.tok = model_dir, tok
        Admission.__init__(self, max_pending)
        self.stop_ids = stop_ids(tok)
        self.engine_kwargs = engine_kwargs
        self.batches: deque[int] = deque(maxlen=4096)  # vLLM batches internally; kept empty
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fasttrack-vllm",
                                        daemon=True)  # fmt: skip
        self.engine: Any = None

    def start(self) -> VllmBatcher:
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        args = AsyncEngineArgs(model=str(self.model_dir), **self.engine_kwargs)
        self.engine = AsyncLLMEngine.from_engine_args(args)
        self._thread.start()
        return self

    def submit(self, req: Request) -> Future:
        self.admit(req)
        asyncio.run_coroutine_threadsafe(self._generate(req), self._loop)
        return req.future

    async def _generate(self, req: Request) -> None:
        rid = uuid.uuid4().hex
        sent = [""] * req.n
        final: Any = None
        try:
            params = sampling_params(req, self.stop_ids)
            prompt = {"prompt_token_ids": list(req.ids)}
            async for out in self.engine.generate(prompt, params, request_id=rid):
                if req.cancelled.is_set():
                    await self.engine.abort(rid)
                    break
                final = out
                for o in out.outputs:
                    text = o.text.lstrip()
                    if req.on_delta and len(text) > len(sent[o.index]):
                        req.on_delta(o.index, text[len(sent[o.index]) :])
                        sent[o.index] = text
        except Exception as exc:  # noqa: BLE001 - the request fails, not the server
            req.future.set_exception(exc)
            return
        outputs = sorted(final.outputs, key=lambda o: o.index) if final else []
        done = []
        for o in outputs:
            text, hit = cut_at_stop(o.text, req.stop)
            reason = "stop" if hit else (o.finish_reason if o.finish_reason == "stop" else "length")
            done.append(Completion(text.strip(), len(o.token_ids), reason))
        req.future.set_result(done)

    def stop(self, timeout: float | None = None) -> None:
        """Requests in flight were drained by uvicorn; stop the loop and the engine."""
        if self.engine is not None and hasattr(self.engine, "shutdown"):
            self.engine.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
