"""`fasttrack ask | serve | export`: use and ship the models a run trained."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core
from rich.markup import escape
from rich.table import Table

from fasttrack.core.errors import FastTrackError
from flows.cli_common import (
    _fail,
    _quiet_prefect_tracebacks,
    _split,
    app,
    console,
    err,
    rich_table,
    show,
    split_overrides,
)


@app.command()
def ask(
    args: Annotated[
        list[str], typer.Argument(help='[CONFIG] "question"', metavar="[CONFIG] QUESTION")
    ],
    k: Annotated[int | None, typer.Option(help="Chunks to retrieve (default: rag.top_k)")] = None,
    mode: Annotated[str | None, typer.Option(help="dense | bm25 | hybrid")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override KEY=VALUE")] = None,
    model: Annotated[
        str | None, typer.Option(help="dpo | sft | pretrain | base (default: most trained)")
    ] = None,
    server: Annotated[
        str | None, typer.Option(help="URL of a running `fasttrack serve` (no model loaded here)")
    ] = None,
    api_key_env: Annotated[
        str | None, typer.Option(help="Environment variable holding the server's API key")
    ] = None,
) -> None:
    """Answer from the run's RAG index with its newest model (DPO > SFT > pretrain); says why
    newer ones are missing. The untrained base model only with --model base."""
    if len(args) > 2:
        _fail(FastTrackError('ask: expected [CONFIG] "question" (quote the question)'))
    config, question = (None, args[0]) if len(args) == 1 else args
    try:
        if server:
            from fasttrack.lib.serve_client import ask_server

            result = ask_server(server, question, _api_key(api_key_env))
        else:  # --server needs none of this: no Prefect, torch or stage modules to import
            import tasks  # noqa: F401  (registers every stage: the chain computes their keys)
            from fasttrack.core.config_loader import load_config
            from fasttrack.lib.ask import answer

            cfg = load_config(config, split_overrides(set_))
            result = answer(cfg, question, k=k, mode=mode, model=model)
    except FastTrackError as exc:
        _fail(exc)
    for note in result.notes:
        err.print(f"[yellow]note:[/] not using {escape(note)}", highlight=False, soft_wrap=True)
    text = escape(result.text) if result.text else "[dim](the model produced no text)[/]"
    console.print(f"[bold]{result.model_stage}[/] ({result.model_key}): {text}", soft_wrap=True)
    sources = Table(title=f"sources ({result.mode})")
    used = len(result.hits) if result.in_prompt is None else result.in_prompt
    for col in ("#", "title", "section", "score", "in prompt"):
        sources.add_column(col)
    for i, hit in enumerate(result.hits):
        row = (str(hit.rank), hit.title, hit.section or "", f"{hit.score:.3f}")
        sources.add_row(*row, "yes" if i < used else "no (past the context)")
    show(sources)
    if used < len(result.hits):
        err.print(f"[yellow]note:[/] {used} of {len(result.hits)} retrieved chunks fit the "
                  "model's context; the lowest-ranked were left out", soft_wrap=True)  # fmt: skip


def _api_key(env: str | None) -> str | None:
    if env is None:
        return None
    if not os.environ.get(env):
        raise FastTrackError(f"--api-key-env {env}: the environment variable is not set or empty")
    return os.environ[env]


@app.command()
def serve(
    config: Annotated[
        str | None, typer.Argument(help="Run config YAML (default: tiny-cpu)")
    ] = None,
    model: Annotated[
        str, typer.Option(help="promoted (else newest) | dpo | sft | pretrain | base | KEY")
    ] = "promoted",
    rag: Annotated[
        bool | None,
        typer.Option(
            "--rag/--no-rag",
            help="Answer chat from the run's RAG index (default: if the run has one)",
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    api_key_env: Annotated[
        str | None, typer.Option(help="Environment variable holding the API key clients send")
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Rows decoding together")] = 32,
    max_pending: Annotated[int, typer.Option(help="Requests in flight before 429")] = 256,
    threads: Annotated[
        int | None, typer.Option(help="torch threads (default: torch's; 1 suits small models)")
    ] = None,
    engine: Annotated[
        str, typer.Option(help="transformers, or vllm (CUDA; serves the merged export)")
    ] = "transformers",
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override KEY=VALUE")] = None,
) -> None:
    """Serve the run's model behind an OpenAI-compatible API (FastAPI + uvicorn)."""
    from fasttrack.core.config_loader import load_config

    try:
        if engine not in ("transformers", "vllm"):
            raise FastTrackError(
                f"serve --engine {engine}: unknown engine (engines: transformers, vllm)"
            )
        if engine == "vllm":
            from fasttrack.lib.device_info import check_vllm

            check_vllm()  # before anything loads
        if max_batch < 1 or max_pending < 1 or (threads is not None and threads < 1):
            raise FastTrackError(
                "serve: --max-batch, --max-pending and --threads must be at least 1"
            )
        key = _api_key(api_key_env)
        cfg = load_config(config, split_overrides(set_))
        import tasks  # noqa: F401  (registers every stage: the model chain computes their keys)
        from fasttrack.lib.serve_model import resolve_model

        resolve_model(cfg, model)  # a run with nothing to serve answers before torch loads
        from fasttrack.lib.serve_run import load_served, run_server

        merged = _merged_export(config, cfg, model, set_) if engine == "vllm" else None
        served = load_served(cfg, model, rag=rag, api_key=key, max_batch=max_batch,
                             max_pending=max_pending, threads=threads,
                             merged_dir=merged)  # fmt: skip
    except FastTrackError as exc:
        _fail(exc)
    where = "with RAG" if served.retriever is not None else "without RAG"
    err.print(f"serving {served.model_id} {where} on http://{host}:{port}/v1", soft_wrap=True)
    run_server(served, host, port)


def _merged_export(config: str | None, cfg: Any, which: str, set_: list[str] | None) -> Path:
    """The `merged` export of the model `serve --model` picks (built, or reused from the
    store): the plain model directory vLLM loads."""
    from fasttrack.core.store import ArtifactStore
    from fasttrack.lib.serve_model import resolve_model
    from flows.export import ExportParams, export_flow

    _, ref = resolve_model(cfg, which)
    params = ExportParams(config=config, formats=["merged"], model=ref.key,
                          overrides=split_overrides(set_))  # fmt: skip
    step = export_flow(params).steps[-1]
    store = ArtifactStore(cfg.store)
    return store.local_path(store.lookup("export", step.key))


@app.command("export")
def export(
    config: Annotated[
        str | None, typer.Argument(help="Run config YAML of the run (default: tiny-cpu)")
    ] = None,
    format_: Annotated[
        list[str] | None,
        typer.Option("--format", help="merged, bnb-8bit, bnb-4bit, gguf-f16, gguf-q8_0"),
    ] = None,
    model: Annotated[
        str, typer.Option(help="newest, dpo, sft, pretrain, base, or a model artifact key")
    ] = "",
    force: Annotated[bool, typer.Option(help="Re-export even if cached")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override KEY=VALUE")] = None,
) -> None:
    """Export a trained model of the run (config `export.*`); one cached artifact per format."""
    from fasttrack.core.config_eval import check_export_formats
    from fasttrack.core.config_loader import load_config

    try:  # before Prefect and the stages load
        cfg = load_config(config, split_overrides(set_))
        check_export_formats(_split(format_), list(cfg.export.formats))
    except FastTrackError as exc:
        _fail(exc)
    from flows.export import ExportParams, export_flow, resolve

    params = ExportParams(config=config, formats=_split(format_), model=model,
                          overrides=split_overrides(set_), force=force)  # fmt: skip
    try:
        resolve(params)  # fail fast, before Prefect starts
        _quiet_prefect_tracebacks()
        from flows.prefect_server import use_local_api

        with use_local_api():
            summary = export_flow(params)
    except FastTrackError as exc:
        _fail(exc)
    steps = ", ".join(f"{s.step} {s.status}" for s in summary.steps)
    console.print(f"run {summary.name}: {steps}", soft_wrap=True, highlight=False)
    show(rich_table(summary.exports, title=f"exports (store {summary.store})"))
