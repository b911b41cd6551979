"""`rag.answer: quote` behind `fasttrack serve`: RAG chat answers are the quoted sentence `ask`
gives (fasttrack/lib/quote.py), so `ask --server` and a local `ask` answer alike.

`QuoteEngine` has the one method of the `Batcher` the chat route uses (`submit(request) ->
Future[list[Completion]]`, deltas through `request.on_delta`), so the non-streamed and streamed
replies, usage and `sources` are built by the same code as generated answers. Scoring runs in a
worker thread, one question at a time (a lock): it reads the weights the batcher's thread
reads, and writes nothing.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

from fasttrack.lib.batcher import Completion
from fasttrack.lib.batcher import Request as GenRequest

_LOCK = threading.Lock()


class QuoteEngine:
    def __init__(self, model: Any, tok: Any, prompt: str, hits: list[Any], room: int | None):
        self.model, self.tok, self.prompt, self.hits, self.room = model, tok, prompt, hits, room

    def _answer(self, req: GenRequest) -> list[Completion]:
        from fasttrack.lib.ask import quoted

        with _LOCK:
            text = quoted(self.model, self.tok, self.prompt, self.hits, req.g.max_new_tokens,
                          self.room)  # fmt: skip
        tokens = len(self.tok(text, add_special_tokens=False)["input_ids"])
        for i in range(req.n):  # n copies: the quote is deterministic
            if req.on_delta is not None and text:
                req.on_delta(i, text)
        return [Completion(text, tokens, "stop") for _ in range(req.n)]

    def submit(self, req: GenRequest) -> Future:
        def work() -> None:
            try:
                req.future.set_result(self._answer(req))
            except BaseException as exc:  # noqa: BLE001 - the route reports it
                req.future.set_exception(exc)

        threading.Thread(target=work, name="quote", daemon=True).start()
        return req.future
