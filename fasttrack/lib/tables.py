"""The run's metric tables: one row per evaluated model, one per retrieval mode, one per export.

Shared by the flow (Prefect table artifact, CLI summary) and the report stage.
"""

from __future__ import annotations

from typing import Any

from fasttrack.core.store import ArtifactRef

SMALL_SAMPLE = 30  # a metric on fewer rows is flagged (`small_n`) in the run table and report

TABLE_KEY = "fasttrack-metrics"
TABLE_COLUMNS = ("perplexity", "bits_per_byte", "sft_loss", "rouge1", "rouge2", "rougeL", "bleu",
                 "pref_accuracy", "pref_margin", "recall@5")  # fmt: skip
RETRIEVAL_COLUMNS = ("recall@1", "recall@5", "recall@10", "mrr")


def small_sample_note(counts: dict[str, int | None]) -> str:
    """`metric n=2, ...` for every metric computed on fewer than SMALL_SAMPLE rows ("" if none)."""
    small = [f"{m} n={n}" for m, n in counts.items() if n is not None and n < SMALL_SAMPLE]
    return ", ".join(small)


def small_n_note(rows: list[dict[str, Any]]) -> str:
    """The report's line under a table with flagged cells ("" when none)."""
    if not any(r.get("small_n") for r in rows):
        return ""
    return (f"_`small_n`: computed on fewer than {SMALL_SAMPLE} rows; a difference there is "
            "likely noise. Evaluate more rows (evaluate.answers.max_rows, "
            "evaluate.generation_rows, rag.eval) before trusting it._")  # fmt: skip


def metrics_table(evals: dict[str, ArtifactRef]) -> list[dict[str, Any]]:
    """One row per evaluated model (stage name), the metric columns of TABLE_COLUMNS."""
    rows = []
    for model, ref in evals.items():
        row: dict[str, Any] = {"model": model}
        row.update({col: ref.metrics.get(col) for col in TABLE_COLUMNS})
        m = ref.metrics
        counts = {
            "sft_loss": m.get("sft_loss_rows"),
            "pref_accuracy": m.get("pref_rows"),
            "rouge/bleu": m.get("generation_rows"),
            "recall@5": m.get("eval_questions"),
        }
        row["small_n"] = small_sample_note(counts) or None  # fmt: skip
        row["eval_key"] = ref.short
        rows.append(row)
    return rows


def retrieval_table(rag: ArtifactRef) -> list[dict[str, Any]]:
    """One row per retrieval mode (dense, bm25, hybrid) of the RAG artifact's evaluation."""
    rows = []
    for mode in ("dense", "bm25", "hybrid"):
        values = {c: rag.metrics.get(f"{mode}.{c}") for c in RETRIEVAL_COLUMNS}
        if any(v is not None for v in values.values()):
            n = rag.metrics.get("eval_questions")
            note = small_sample_note({"all": n}).replace("all ", "") or None
            rows.append({"retrieval": mode, **values, "questions": n, "small_n": note})
    return rows


def publish_table(rows: list[dict[str, Any]], run_name: str) -> None:
    """The metrics table as a Prefect table artifact with a stable key (history in the UI)."""
    from prefect.artifacts import create_table_artifact

    create_table_artifact(
        table=rows, key=TABLE_KEY, description=f"FastTrack metrics of run config `{run_name}`"
    )


def export_row(metrics: dict[str, Any], key: str) -> dict[str, Any]:
    """One row of the export table (what the report, the CLI and the Prefect artifact show)."""
    return {
        "format": metrics["format"],
        "size_MB": round(metrics["size_bytes"] / 2**20, 3),
        "perplexity": metrics["perplexity"],
        "ppl_delta": metrics["perplexity_delta"],
        "tokens_per_s": metrics["tokens_per_second"],
        "logit_err": metrics.get("logit_max_rel_err"),
        "export_key": key[:12],
    }


def export_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of export rows."""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join("-" if v is None else str(v) for v in row.values()) + " |")
    return "\n".join(lines) + "\n"
