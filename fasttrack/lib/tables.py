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
    harness = sorted({k for ref in evals.values() for k in ref.metrics
                      if k.startswith("lm_eval.") and not k.endswith(".rows")})  # fmt: skip
    for model, ref in evals.items():
        row: dict[str, Any] = {"model": model}
        row.update({col: ref.metrics.get(col) for col in (*TABLE_COLUMNS, *harness)})
        m = ref.metrics
        counts = {
            "perplexity": m.get("eval_documents"),
            "sft_loss": m.get("sft_loss_rows"),
            "pref_accuracy": m.get("pref_rows"),
            "rouge/bleu": m.get("generation_rows"),
            "recall@5": m.get("eval_questions"),
        }
        counts |= {k.removesuffix(".rows"): m[k] for k in m if k.startswith("lm_eval.")
                   and k.endswith(".rows")}  # fmt: skip
        row["small_n"] = small_sample_note(counts) or None  # fmt: skip
        row["eval_key"] = ref.short
        ci = m.get("ci") or {}
        row["ci"] = {col: ci[col] for col in row if col in ci}
        rows.append(row)
    return rows


def retrieval_table(rag: ArtifactRef, store: Any = None, boot: Any = None) -> list[dict[str, Any]]:
    """One row per retrieval mode (dense, bm25, hybrid) of the RAG artifact's evaluation; with
    `store` and `boot` (a stats.Bootstrap), each row's `ci` holds the bootstrap intervals of
    recall@k and MRR over the questions (from the artifact's per-question ranks)."""
    ranks = _ranks(rag, store) if boot is not None else {}
    rows = []
    for mode in ("dense", "bm25", "hybrid"):
        values = {c: rag.metrics.get(f"{mode}.{c}") for c in RETRIEVAL_COLUMNS}
        if any(v is not None for v in values.values()):
            n = rag.metrics.get("eval_questions")
            note = small_sample_note({"all": n}).replace("all ", "") or None
            row = {"retrieval": mode, **values, "questions": n, "small_n": note}
            if ranks.get(mode):
                from fasttrack.lib.evalstats import intervals, rank_scores

                ks = [int(c.removeprefix("recall@")) for c in RETRIEVAL_COLUMNS if "@" in c]
                ci = intervals({"retrieval": rank_scores(ranks[mode], ks)}, boot)
                shown = [c for c in RETRIEVAL_COLUMNS if values[c] is not None]
                row["ci"] = {c: ci[c] for c in shown if c in ci}
            rows.append(row)
    return rows


def _ranks(rag: ArtifactRef, store: Any) -> dict[str, list[int | None]]:
    """mode -> rank of the expected document per question ({} for artifacts without ranks)."""
    import json

    from fasttrack.lib.evalstats import RANKS_FILE

    path = store.local_path(rag) / RANKS_FILE if store is not None else None
    return json.loads(path.read_text()) if path is not None and path.exists() else {}


def cell(value: Any, interval: list[float] | None = None) -> str | None:
    """`0.1534 [0.1203, 0.1811]`: the value and its interval, 4 significant digits."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None if value is None else str(value)
    text = f"{value:.4g}" if abs(value) < 1e4 else f"{value:.1f}"
    if interval:
        text += " [" + ", ".join(f"{v:.4g}" if abs(v) < 1e4 else f"{v:.1f}" for v in interval) + "]"
    return text


def display_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows for people (CLI, report, Prefect UI): each metric cell carries its interval; the
    nested `ci` goes. The data rows themselves keep plain floats (gates, plots, sweeps)."""
    out = []
    for row in rows:
        ci = row.get("ci") or {}
        shown = {}
        for col, value in row.items():
            if col == "ci":
                continue
            shown[col] = cell(value, ci.get(col)) if col in ci else value
        out.append(shown)
    return out


def publish_table(rows: list[dict[str, Any]], run_name: str, level: float = 0.95) -> None:
    """The metrics table (values with their intervals) as a Prefect table artifact with a
    stable key (history in the UI)."""
    from prefect.artifacts import create_table_artifact

    create_table_artifact(
        table=display_rows(rows),
        key=TABLE_KEY,
        description=f"FastTrack metrics of run config `{run_name}`; [low, high]: "
        f"{level:.0%} bootstrap interval",
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
