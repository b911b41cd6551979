"""RAG in the flow (concurrently with training) and `fasttrack ask` end to end."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from fasttrack.core.store import ArtifactStore
from flows.cli import app
from flows.pipeline import PipelineParams, pipeline
from tests.conftest import tiny_config_dict, write_config

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_harness")]


def test_rag_in_the_flow_then_ask_answers_with_sources(tmp_path: Path) -> None:
    sources = [
        {"path": "demo:stdlib_docs", "format": "text", "max_rows": 60},
        {"path": "demo:stdlib_qa", "format": "alpaca", "max_rows": 60},
    ]
    d = tiny_config_dict(tmp_path / "store", data={"sources": sources})
    d["generation"] = {"max_new_tokens": 12}
    path = write_config(tmp_path / "c.yaml", d)
    stages = ["data", "pretrain", "sft", "rag", "evaluate"]
    summary = pipeline(PipelineParams(config=str(path), stages=stages))
    steps = {s.step: s for s in summary.steps}
    assert steps["rag"].status == "executed" and steps["rag"].metrics["chunks"] > 0
    assert {r["retrieval"] for r in summary.retrieval} == {"dense", "bm25", "hybrid"}
    with_rag = {r["model"]: r for r in summary.table}["sft+rag"]  # newest model + context
    assert with_rag["recall@5"] is not None and with_rag["rougeL"] is not None
    again = pipeline(PipelineParams(config=str(path), stages=stages))
    assert again.executed == []  # the index too: no embedding on an unchanged corpus

    # A function whose docstring survived dedup and is in the index (near-duplicate siblings such
    # as base64.b32decode/b64decode are rightly collapsed to one document).
    chunks = Path(ArtifactStore(str(tmp_path / "store")).uri("rag", steps["rag"].key))
    titles = sorted(set(pq.read_table(chunks / "chunks.parquet").column("title").to_pylist()))
    title = next(t for t in titles if t.startswith("base64."))
    result = CliRunner().invoke(app, ["ask", str(path), f"What does `{title}` do?", "--k", "3"])
    assert result.exit_code == 0, result.output
    assert "sft" in result.stdout  # the newest model of this run answered
    assert title in result.stdout  # and the source that holds the answer is cited
    assert "sources (hybrid)" in result.stdout
    # the tiny model's 128 positions hold the best chunk only: said, not silently cut
    assert "of 3 retrieved chunks fit the model's context" in result.stderr
    assert "no (past the context)" in result.stdout
    # rag.answer=quote (not in the index's key): a sentence of the chunk in the prompt, cited
    quote = ["ask", str(path), f"What does `{title}` do?", "--k", "3", "--set", "rag.answer=quote"]
    quoted = CliRunner().invoke(app, quote)
    assert quoted.exit_code == 0, quoted.output
    said = quoted.stdout.splitlines()[0].split("): ", 1)[1]
    table = pq.read_table(chunks / "chunks.parquet")
    texts = [" ".join(t.split()) for t in table.column("text").to_pylist()]
    assert said.endswith(" [1]") and any(said[: -len(" [1]")] in t for t in texts), said
    # It says why no newer model answered, and never falls back silently (issue #20)
    assert "note: not using dpo: not trained for this config (no dpo_ref " in result.stderr
    store = ArtifactStore(str(tmp_path / "store"))
    weights = Path(store.uri("sft", steps["sft"].key)) / "adapter_model.safetensors"
    damaged = bytearray(weights.read_bytes())
    damaged[-10] ^= 0xFF
    weights.write_bytes(damaged)
    result = CliRunner().invoke(app, ["ask", str(path), "What is base64?"])
    assert result.exit_code == 0 and result.stdout.startswith("pretrain ("), result.output
    assert f"note: not using sft: sft {steps['sft'].key[:12]} is corrupt (" in result.stderr
    assert "quarantined to " in result.stderr and "`fasttrack run` rebuilds it" in result.stderr
    assert not weights.exists()  # moved aside, as a run would
    other = ["ask", str(path), "What is base64?", "--set", "pretrain.max_steps=7"]
    result = CliRunner().invoke(app, other)  # a config no run has trained
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert "no trained model for run 'test-tiny'" in errors[0]
    assert "pretrain: not trained for this config (no pretrain " in errors[0]
    assert "--model base" in errors[0]
    result = CliRunner().invoke(app, [*other, "--model", "base"])  # asked for explicitly
    assert result.exit_code == 0 and result.stdout.startswith("base ("), result.output


def test_ask_without_an_index_says_what_to_run(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path / "store"))
    result = CliRunner().invoke(app, ["ask", str(path), "anything"])
    assert result.exit_code == 2
    assert "run `fasttrack run` first" in result.stderr or "rag stage" in result.stderr
