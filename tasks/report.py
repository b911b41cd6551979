"""The report of a run: one comparison table, retrieval figures, gates, exports, samples, plots.

A cached artifact keyed by the evaluation (and RAG) artifacts it summarises plus the gates, so
`fasttrack report` can re-print any past run from the store alone; it is also published to the
Prefect UI as the markdown artifact `fasttrack-report`. Exports run after the gates, so a run
with `export.formats` writes the report twice: before the gates (what a failed gate leaves)
and after the exports, with their table (its key also covers the export artifacts).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fasttrack.core.config import RunConfig
from fasttrack.core.log import get_logger
from fasttrack.core.stage import BuildResult, Stage, StageSpec
from fasttrack.core.store import ArtifactRef, ArtifactStore
from fasttrack.core.store_admin import find_report  # noqa: F401  (re-exported)
from fasttrack.lib.evalstats import bootstrap_of, load_scores, stage_verdicts
from fasttrack.lib.gates import describe, run_gates
from fasttrack.lib.stats import Bootstrap
from fasttrack.lib.tables import (
    display_rows,
    export_row,
    export_table,
    metrics_table,
    retrieval_table,
    small_n_note,
)

# 2: intervals and stage-to-stage verdicts; 3: retrieval intervals; 4: pref_margin verdicts
STAGE = Stage("report", "4")
REPORT_KEY = "fasttrack-report"
TRAINING = ("pretrain", "sft", "dpo")


def report_spec(
    cfg: RunConfig,
    evals: dict[str, ArtifactRef],
    models: dict[str, ArtifactRef],
    rag: ArtifactRef | None = None,
    exports: list[ArtifactRef] | None = None,
) -> StageSpec:
    upstream = {f"eval:{m}": ref for m, ref in evals.items()}
    upstream |= {f"model:{m}": ref for m, ref in models.items()}
    if rag is not None:
        upstream["rag"] = rag
    upstream |= {f"export:{ref.metrics['format']}": ref for ref in exports or []}
    config = {"run": cfg.name, "gates": cfg.evaluate.gates}
    config["bootstrap"] = cfg.evaluate.bootstrap.model_dump(mode="json")  # tests and intervals
    return STAGE.spec(config, upstream)


def _md_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else "–" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _verdict_table(verdicts: list[dict[str, Any]]) -> str:
    rows = [
        {
            "from → to": f"{v['from']} → {v['to']}", "metric": v["metric"],
            "from": v["from_value"], "to": v["to_value"], "Δ": v["delta"],
            "p": v["p_value"], "rows": v["rows"], "verdict": v["verdict"],
        }
        for v in verdicts
    ]  # fmt: skip
    return _md_table(rows)


def seed_spread(evals: dict[str, ArtifactRef]) -> list[dict[str, Any]]:
    """Per model and generation metric: mean, sd, min and max over `evaluate.seeds`."""
    import statistics

    rows = []
    for model, ref in evals.items():
        runs = ref.metrics.get("seeds") or {}
        for metric, values in runs.items():
            if metric == "seeds" or metric not in ("rougeL", "bleu", "rouge1"):
                continue
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            rows.append({"model": model, "metric": metric, "mean": statistics.fmean(values),
                         "sd": sd, "min": min(values), "max": max(values),
                         "seeds": len(values)})  # fmt: skip
    return rows


def render(
    cfg: RunConfig,
    table: list,
    retrieval: list,
    gates: list,
    samples: dict,
    plots: list,
    verdicts: list | None = None,
    spread: list | None = None,
    exports: list | None = None,
) -> str:
    level = cfg.evaluate.bootstrap.level
    b = cfg.evaluate.bootstrap
    parts = [
        f"# FastTrack report: `{cfg.name}`",
        "",
        "## Models on held-out data",
        "",
        _md_table(display_rows(table)),
        "",
        f"_[low, high]: {level:.0%} percentile-bootstrap interval ({b.resamples} resamples of "
        f"the rows, seed {b.seed}; perplexity and bits/byte resample documents)._",
    ]
    if note := small_n_note(table):
        parts += ["", note]
    if verdicts:
        parts += [
            "",
            "## Stage to stage",
            "",
            f"Paired approximate-randomization test on the same rows ({b.resamples} "
            f"resamples); a change is significant when p < {1 - level:.2g}.",
            "",
            _verdict_table(verdicts),
        ]
    if spread:
        parts += ["", "## Across generation seeds", "", f"Answers re-generated with each of "
                  f"evaluate.seeds {cfg.evaluate.seeds} ({cfg.generation.strategy} decoding).",
                  "", _md_table(spread)]  # fmt: skip
    if retrieval:
        parts += ["", "## Retrieval (held-out questions)", "", _md_table(display_rows(retrieval))]
        if note := small_n_note(retrieval):
            parts += ["", note]
    if gates:
        parts += ["", "## Promotion gates", ""] + [f"- {describe(g)}" for g in gates]
    if exports:
        parts += ["", "## Exports", "", export_table(exports).rstrip(), "",
                  "_Each export measured as loaded back from its own files: size on disk, "
                  "perplexity on the held-out split and its delta vs the merged model, greedy "
                  "generation tokens/s on this machine; `logit_err`: GGUF's largest logit "
                  "difference from the merged model on `export.prompt`, relative._"]  # fmt: skip
    for plot in plots:
        parts += ["", f"![{plot}]({plot})"]
    if samples:
        parts += ["", "## Sample generations", ""]
        for model, rows in samples.items():
            for row in rows[:2]:
                parts += [
                    f"**{model}** — _{row['prompt']}_",
                    "",
                    f"> {row['prediction'] or '(empty)'}",
                    "",
                ]
    decoding = cfg.generation.model_dump()
    parts += ["", f"Decoding: `{json.dumps(decoding)}`; seed {cfg.seed}."]
    return "\n".join(parts) + "\n"


def build_report(cfg: RunConfig, spec: StageSpec, out: Path) -> BuildResult:
    store = ArtifactStore(cfg.store)
    evals = {k.removeprefix("eval:"): v for k, v in spec.upstream.items() if k.startswith("eval:")}
    models = {
        k.removeprefix("model:"): v for k, v in spec.upstream.items() if k.startswith("model:")
    }
    table = metrics_table(evals)
    rag = spec.upstream.get("rag")
    retrieval = retrieval_table(rag, store, bootstrap_of(cfg)) if rag else []
    gates = run_gates(cfg, table, evals)
    b = cfg.evaluate.bootstrap
    boot = Bootstrap(b.resamples, b.seed, b.level)
    verdicts = [v.row(1 - b.level) for v in stage_verdicts(load_scores(store, evals), boot)]
    samples = {}
    for model, ref in evals.items():
        path = store.local_path(ref) / "samples.jsonl"
        if path.exists():
            samples[model] = [json.loads(line) for line in path.read_text().splitlines()]
    exports = [export_row(r.metrics, r.key) for k, r in spec.upstream.items()
               if k.startswith("export:")]  # fmt: skip
    plots = make_plots(store, models, table, out)
    spread = seed_spread(evals)
    report = render(cfg, table, retrieval, gates, samples, plots, verdicts, spread, exports)
    (out / "report.md").write_text(report)
    summary = {
        "table": table,
        "retrieval": retrieval,
        "gates": [g.__dict__ for g in gates],
        "verdicts": verdicts,
        "seed_spread": spread,
        "exports": exports,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    metrics = {
        "gates_passed": sum(g.passed for g in gates),
        "gates_failed": sum(not g.passed for g in gates),
    }
    return BuildResult(metrics=metrics, extra={"run": cfg.name, "summary": summary})


def make_plots(store: ArtifactStore, models: dict, table: list, out: Path) -> list[str]:
    """Loss curves of the training stages and metric bars; skipped (logged) if plotting fails."""
    try:
        from fasttrack.lib.plots import loss_curves, metric_bars

        histories = {}
        for stage in TRAINING:
            if stage in models:
                log = store.local_path(models[stage]) / "log_history.json"
                if log.exists():
                    histories[stage] = json.loads(log.read_text())
        made = []
        if histories:
            made.append(loss_curves(histories, out / "loss_curves.png").name)
        metrics = [m for m in ("perplexity", "sft_loss", "rougeL", "bleu", "pref_accuracy")
                   if any(r.get(m) is not None for r in table)]  # fmt: skip
        if table and metrics:
            made.append(metric_bars(table, metrics, out / "metrics.png").name)
        return made
    except Exception as exc:  # plots are a nicety; the report must not fail because of them
        get_logger().warning("report: plots skipped: %s", exc)
        return []


write_report, report_task = STAGE.define(report_spec, build_report)


def publish_report(cfg: RunConfig, report: ArtifactRef) -> str:
    """The report as the Prefect markdown artifact `fasttrack-report` (stable key: history)."""
    from prefect.artifacts import create_markdown_artifact

    text = (ArtifactStore(cfg.store).local_path(report) / "report.md").read_text()
    create_markdown_artifact(markdown=text, key=REPORT_KEY, description=f"run {cfg.name}")
    return text
