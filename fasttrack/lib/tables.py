"""The run's metric tables: one row per evaluated model, one per retrieval mode.

Shared by the flow (Prefect table artifact, CLI summary) and the report stage.
"""

from __future__ import annotations

from typing import Any

from fasttrack.core.store import ArtifactRef

TABLE_KEY = "fasttrack-metrics"
TABLE_COLUMNS = ("perplexity", "bits_per_byte", "sft_loss", "rouge1", "rouge2", "rougeL", "bleu",
                 "pref_accuracy", "pref_margin", "recall@5")  # fmt: skip
RETRIEVAL_COLUMNS = ("recall@1", "recall@5", "recall@10", "mrr")


def metrics_table(evals: dict[str, ArtifactRef]) -> list[dict[str, Any]]:
    """One row per evaluated model (stage name), the metric columns of TABLE_COLUMNS."""
    rows = []
    for model, ref in evals.items():
        row: dict[str, Any] = {"model": model}
        row.update({col: ref.metrics.get(col) for col in TABLE_COLUMNS})
        row["eval_key"] = ref.short
        rows.append(row)
    return rows


def retrieval_table(rag: ArtifactRef) -> list[dict[str, Any]]:
    """One row per retrieval mode (dense, bm25, hybrid) of the RAG artifact's evaluation."""
    rows = []
    for mode in ("dense", "bm25", "hybrid"):
        values = {c: rag.metrics.get(f"{mode}.{c}") for c in RETRIEVAL_COLUMNS}
        if any(v is not None for v in values.values()):
            rows.append({"retrieval": mode, **values})
    return rows


def publish_table(rows: list[dict[str, Any]], run_name: str) -> None:
    """The metrics table as a Prefect table artifact with a stable key (history in the UI)."""
    from prefect.artifacts import create_table_artifact

    create_table_artifact(
        table=rows, key=TABLE_KEY, description=f"FastTrack metrics of run config `{run_name}`"
    )
