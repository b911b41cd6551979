"""Batching for the server: one worker thread owns the model and answers many requests at once.

Continuous (iteration-level) batching: the worker steps every active row one token per forward
over a shared KV cache (`decode_loop.Slots`), admits requests that arrived between two steps
(prefilled together, then merged into the running batch) and answers a request as soon as its
own rows are finished, so a short request never waits for a long one. Rows are independent
under the attention mask and their own position ids, and each row applies its own logits
processors and RNG, so a greedy (or seeded) answer is the one `generate` gives for that prompt
alone, whatever else is in flight. Each row ends at its token budget, its stop strings, the
model's stop tokens, or when its client went away, and streams its new text as it grows.

Beam search, and models whose cache cannot be stepped (`decode_loop.can_step`), go through
`generate`: requests with the same decoding settings are left-padded into one call.
"""

from __future__ import annotations

import copy
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from fasttrack.core.config_eval import GenerationConfig
from fasttrack.core.errors import FastTrackError
from fasttrack.core.templates import stop_ids
from fasttrack.lib.decode_loop import Live, Slots, can_step, row_processors, row_wise
from fasttrack.lib.generate import decode_answer, generation_kwargs


class Busy(FastTrackError):
    """The queue of pending requests is full (the server answers 429)."""


@dataclass
class Completion:
    text: str
    tokens: int  # generated tokens, stop strings included
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


@dataclass
class Request:
    """One prompt (already templated and tokenized) to answer `n` times."""

    ids: list[int]
    g: GenerationConfig
    stop: list[str] = field(default_factory=list)
    n: int = 1
    seed: int | None = None
    on_delta: Callable[[int, str], None] | None = None  # (choice index, new text), worker thread
    cancelled: threading.Event = field(default_factory=threading.Event)
    future: Future = field(default_factory=Future)  # -> list[Completion]

    def group(self) -> tuple:
        """Requests with the same group share a batch."""
        settings = self.g.model_dump(exclude={"max_new_tokens"})
        alone = self.seed if self.g.strategy == "sample" and self.seed is not None else None
        if self.g.strategy == "beam" or alone is not None:
            return ("alone", id(self))
        return tuple(sorted(settings.items()))


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """`text` up to the earliest stop string (excluded), and whether one was found."""
    cuts = [i for s in stop if s and (i := text.find(s)) >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class _Row:
    """One output sequence: its budget, stop strings, streamed text so far."""

    def __init__(self, req: Request, choice: int, tok: Any, eos: set[int]):
        self.req, self.choice, self.tok, self.eos = req, choice, tok, eos
        self.sent = ""
        self.done = False
        self.finish = "length"
        self.ids: list[int] = []

    def step(self, token: int) -> bool:
        """Record one generated token; True when the row is finished."""
        if self.done:
            return True
        self.ids.append(token)
        if token in self.eos:
            self.done, self.finish = True, "stop"
        elif len(self.ids) >= self.req.g.max_new_tokens or self.req.cancelled.is_set():
            self.done = True
        if self.req.stop or self.req.on_delta:
            text, hit = cut_at_stop(self.raw(), self.req.stop)
            if hit:
                self.done, self.finish = True, "stop"
            self.stream(text)
        return self.done

    def raw(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True).lstrip()

    def stream(self, text: str) -> None:
        """Send the new, settled part: never a partial character, trailing whitespace that
        `strip` may drop, or a tail that could still grow into a stop string."""
        if self.req.on_delta is None:
            return
        text = text.rstrip()
        if not self.done:
            text = text.removesuffix("\ufffd")
            for s in self.req.stop:
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        text = text[:-k].rstrip()
                        break
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.req.on_delta(self.choice, text[len(self.sent) :])
            self.sent = text

    def result(self) -> Completion:
        text, hit = cut_at_stop(decode_answer(self.tok, self.ids), self.req.stop)
        text = text.strip() if hit else text
        self.done = True
        self.stream(text)
        return Completion(text, len(self.ids), "stop" if hit else self.finish)


class _PerRow(StoppingCriteria):
    """Feeds each row its newest token; a row is finished when its own criteria say so."""

    def __init__(self, rows: list[_Row], start: int):
        self.rows, self.start = rows, start

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        if input_ids.shape[1] <= self.start:
            return torch.zeros(len(self.rows), dtype=torch.bool, device=input_ids.device)
        last = input_ids[:, -1].tolist()
        done = [row.step(t) for row, t in zip(self.rows, last, strict=True)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class Admission:
    """Back-pressure shared by the serving engines: at most `max_pending` requests in flight;
    one more is refused with Busy (HTTP 429), and a finished request frees its place."""

    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self._count = 0  # submitted and not finished
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        return self._count

    def admit(self, req: Request) -> None:
        with self._lock:
            if self._count >= self.max_pending:
                raise Busy(f"server busy: {self._count} requests in flight; retry later")
            self._count += 1
        req.future.add_done_callback(self._finished)

    def _finished(self, _: Future) -> None:
        with self._lock:
            self._count -= 1


class Batcher(Admission):
    """The worker thread that owns `model`; `submit` is safe from any thread."""

    def __init__(
        self,
        model: Any,
        tok: Any,
        max_batch: int = 32,
        max_pending: int = 256,
        window_s: float = 0.005,
        threads: int | None = None,
    ):
        # Its own tokenizer: a Rust tokenizer used from two threads while one changes its
        # padding/truncation settings panics ("Already borrowed").
        self.model, self.tok = model, copy.deepcopy(tok)
        self.max_batch, self.window_s = max_batch, window_s
        Admission.__init__(self, max_pending)
        # torch's intra-op threads (process-wide). A small model's decode step is too little
        # work to split: on a busy CPU, 2 threads made one batched step ~10x slower than 1.
        self.threads = threads
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.eos = set(stop_ids(tok, model))
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._pending: list[Request] = []
        self._seeds = itertools.count(1)
        self._thread = threading.Thread(target=self._loop, name="fasttrack-batcher", daemon=True)
        self.batches: deque[int] = deque(maxlen=4096)  # rows of the latest forwards/batches
        self.stepping = can_step(model)
        self._slots = Slots(model)
        self._open: dict[int, tuple[Request, list[_Row]]] = {}  # admitted, not answered
        self._processors: dict[str, Any] = {}  # logits processors by decoding settings

    def start(self) -> Batcher:
        from fasttrack.lib.adapters import disable_cpu_bf16_repack

        disable_cpu_bf16_repack(self.model)
        self.model.eval()
        self._thread.start()
        return self

    def submit(self, req: Request) -> Future:
        self.admit(req)
        self._queue.put(req)
        return req.future

    def stop(self, timeout: float | None = None) -> None:
        """Finish what was submitted, then end the worker."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _take(self, block: bool) -> bool:
        """Move queued requests to pending; False once `stop` was called and all is drained."""
        try:
            item = self._queue.get(block=block)
        except queue.Empty:
            return True
        while True:
            if item is None:
                self._stopping = True
            else:
                self._pending.append(item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return True

    def _loop(self) -> None:
        self._stopping = False
        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            idle = not self._pending and not self._slots
            self._take(block=idle and not self._stopping)
            if not self._pending and not self._slots:
                if self._stopping:
                    return
                continue
            if self.stepping:
                self._admit()
                if self._slots:
                    self._guarded(self._slots.rows, self._step)
                continue
            # Let requests sent together arrive together; under load (the last batch was
            # shared) wait longer, for the clients just answered to send their next request.
            busy = bool(self.batches) and self.batches[-1] > 1
            time.sleep(self.window_s * (6 if busy else 1))
            self._take(block=False)
            self._generate(self._next_batch())

    def _generate(self, batch: list[Request]) -> None:
        """Answer `batch` with one `generate` call (beam search, non-steppable models)."""
        try:
            results = self._run(batch)
        except Exception as exc:  # a failed batch fails its requests, not the server
            for req in batch:
                if not req.future.done():
                    req.future.set_exception(exc)
            return
        for req, completions in zip(batch, results, strict=True):
            req.future.set_result(completions)

    def _admit(self) -> None:
        """Prefill the pending requests that fit beside the running rows, in arrival order."""
        new: list[Live] = []
        rest: list[Request] = []
        for req in self._pending:
            if req.cancelled.is_set():
                req.future.set_result([])
            elif req.g.strategy == "beam":
                self._generate([req])  # between two steps; beams keep their own cache
            elif (self._slots or new) and len(self._slots) + len(new) + req.n > self.max_batch:
                rest.append(req)
            else:
                new += self._rows_of(req)
        self._pending = rest
        if new:
            self._guarded(new, lambda: self._slots.admit(new))
            self._record(new)

    def _step(self) -> None:
        self._slots.step()
        self.batches.append(len(self._slots))
        self._record(self._slots.rows)

    def _rows_of(self, req: Request) -> list[Live]:
        kwargs = generation_kwargs(req.g, self.tok, self.model)
        key = repr(sorted(kwargs.items()))  # same settings: one processor list, one call a step
        processors = self._processors.get(key) or row_processors(self.model, kwargs, len(req.ids))
        if row_wise(processors):  # independent of the prompt: share it
            self._processors[key] = processors
        sample = req.g.strategy == "sample"
        seed = req.seed if req.seed is not None else next(self._seeds)
        rows = [_Row(req, c, self.tok, self.eos) for c in range(req.n)]
        self._open[id(req)] = (req, rows)
        return [
            Live(ids=list(req.ids), processors=processors, sample=sample, owner=row,
                 generator=torch.Generator().manual_seed(seed + c) if sample else None)
            for c, row in enumerate(rows)
        ]  # fmt: skip

    def _record(self, live: list[Live]) -> None:
        """Give each row its newest token; retire finished rows, answer finished requests."""
        done = [r for r in live if r.owner.step(r.next_token)]
        self._slots.retire(done)
        for r in done:
            req = r.owner.req
            entry = self._open.get(id(req))
            if entry and all(row.done for row in entry[1]):
                del self._open[id(req)]
                req.future.set_result([row.result() for row in entry[1]])

    def _guarded(self, live: list[Live], work: Callable[[], None]) -> None:
        """Run a forward; if it fails, fail the requests of `live` and the batch they were in
        (the shared cache is no longer sound), never the server."""
        try:
            with torch.inference_mode():
                work()
        except Exception as exc:  # noqa: BLE001 - reported to each request's client
            victims = {id(r.owner.req): r.owner.req for r in [*live, *self._slots.rows]}
            self._slots.retire(list(self._slots.rows))
            for key, req in victims.items():
                self._open.pop(key, None)
                if not req.future.done():
                    req.future.set_exception(exc)

    def _next_batch(self) -> list[Request]:
        """The oldest request plus younger ones of its group, up to max_batch rows."""
        group = self._pending[0].group()
        batch, rest, rows = [], [], 0
        for req in self._pending:
            if req.cancelled.is_set():
                req.future.set_result([])
            elif req.group() == group and (not batch or rows + req.n <= self.max_batch):
                batch.append(req)
                rows += req.n
            else:
                rest.append(req)
        self._pending = rest
        return batch

    @torch.inference_mode()
    def _run(self, batch: list[Request]) -> list[list[Completion]]:
        if not batch:
            return []
        rows = [_Row(r, c, self.tok, self.eos) for r in batch for c in range(r.n)]
        width = max(len(r.req.ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row.req.ids)
            ids[i, width - n :] = torch.tensor(row.req.ids, dtype=torch.long)
            mask[i, width - n :] = 1
        g = batch[0].g.model_copy(update={"max_new_tokens": max(r.g.max_new_tokens for r in batch)})
        kwargs = generation_kwargs(g, self.tok)
        if g.strategy != "beam":  # beam search keeps its own hypotheses; the budget is enough
            kwargs["stopping_criteria"] = StoppingCriteriaList([_PerRow(rows, width)])
        seed = batch[0].seed if batch[0].seed is not None else next(self._seeds)
        torch.manual_seed(seed)
        device = next(self.model.parameters()).device
        out = self.model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs
        )
        self.batches.append(len(rows))
        if g.strategy == "beam":
            for row, seq in zip(rows, out[:, width:].tolist(), strict=True):
                for t in seq:
                    if row.step(t):
                        break
        results: list[list[Completion]] = [[] for _ in batch]
        index = {id(r): i for i, r in enumerate(batch)}
        for row in rows:
            results[index[id(row.req)]].append(row.result())
        return results
