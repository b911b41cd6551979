"""Load what `fasttrack serve` serves (model once, RAG index, embedder) and run uvicorn.

uvicorn owns the signals: on SIGTERM/SIGINT it stops accepting connections, waits for the
requests in flight (streams included) to finish, then the app's shutdown stops the batcher.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fasttrack.core.config import RunConfig
from fasttrack.core.errors import FastTrackError
from fasttrack.lib.serve_api import Served, create_app

DRAIN_S = 120  # the longest a shutdown waits for requests in flight


def load_served(
    cfg: RunConfig,
    which: str = "promoted",
    rag: bool | None = None,
    api_key: str | None = None,
    max_batch: int = 32,
    max_pending: int = 256,
    threads: int | None = None,
    merged_dir: Path | None = None,
) -> Served:
    """`rag`: None uses the run's index when it has one, True requires it, False never.
    `merged_dir`: serve that merged export with vLLM (`--engine vllm`) instead of
    transformers."""
    from fasttrack.lib.ask import run_index
    from fasttrack.lib.batcher import Batcher
    from fasttrack.lib.models import load_model
    from fasttrack.lib.retrieval import Retriever
    from fasttrack.lib.serve_model import resolve_model

    stage, ref = resolve_model(cfg, which)
    retriever = None
    if rag is not False:
        try:
            retriever = Retriever.open(cfg, run_index(cfg))
        except FastTrackError as exc:
            if rag:
                raise FastTrackError(f"serve --rag: {exc} (or serve with --no-rag)") from None
    if retriever is not None:
        retriever.embedder  # noqa: B018 - load it now, not on the first request
    batcher: Any
    if merged_dir is not None:
        from transformers import AutoConfig, AutoTokenizer

        from fasttrack.lib.serve_vllm import VllmBatcher

        model = AutoConfig.from_pretrained(merged_dir)  # the routes need its context length
        tok = AutoTokenizer.from_pretrained(merged_dir)
        batcher = VllmBatcher(merged_dir, tok, max_pending=max_pending)
    else:
        model, tok = load_model(cfg, ref)
        batcher = Batcher(model, tok, max_batch=max_batch, max_pending=max_pending,
                          threads=threads)  # fmt: skip
    return Served(cfg=cfg, model_id=f"{cfg.name}-{stage}", model=model, tok=tok,
                  batcher=batcher, retriever=retriever, api_key=api_key)  # fmt: skip


def run_server(served: Served, host: str, port: int, **uvicorn_kwargs: Any) -> None:
    import uvicorn

    config = uvicorn.Config(create_app(served), host=host, port=port,
                            timeout_graceful_shutdown=DRAIN_S, **uvicorn_kwargs)  # fmt: skip
    uvicorn.Server(config).run()
