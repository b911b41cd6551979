"""Promotion gates: conditions on the comparison table that a run must meet to be promoted.

A gate is `<model>.<metric> <op> <number | model.metric> [significant]` (validated when the
config loads); `significant` also needs the paired randomization test of the two models on the
same rows (fasttrack/lib/evalstats.py) to give p < 1 - evaluate.bootstrap.level.
All gates are checked and reported together; any failure fails the flow run with the gates and
their values named (the artifacts stay, so the run can be inspected), and a passing run records
its newest model in the store's `promoted.json` under the config's name.
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock

from fasttrack.core.config_eval import GATE_RE
from fasttrack.core.errors import FastTrackError, StoreError
from fasttrack.core.store import PROMOTED, ArtifactRef, ArtifactStore

OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq}
ALIASES = {"rouge_l": "rougeL", "rouge_1": "rouge1", "rouge_2": "rouge2", "rouge_lsum": "rougeLsum"}


# (left model, right model, metric) -> p-value of their paired test, None when not testable
PValue = Callable[[str, str, str], float | None]


class GateError(FastTrackError):
    """One or more promotion gates failed."""


@dataclass(frozen=True)
class GateResult:
    gate: str
    passed: bool
    left: float | None
    right: float | None
    detail: str = ""
    p_value: float | None = None


def _value(table: dict[str, dict[str, Any]], model: str, metric: str) -> float | None:
    value = table.get(model, {}).get(ALIASES.get(metric, metric))
    return float(value) if isinstance(value, int | float) else None


def check_gates(
    gates: list[str],
    rows: list[dict[str, Any]],
    p_value: PValue | None = None,
    alpha: float = 0.05,
) -> list[GateResult]:
    """Evaluate every gate against the table rows (one row per model); `significant` gates ask
    `p_value` (no function or no per-row scores: the gate fails, saying why)."""
    table = {row["model"]: row for row in rows}
    results = []
    for gate in gates:
        m = GATE_RE.match(gate)
        assert m, gate  # validated by the config schema
        left = _value(table, m["model"], m["metric"])
        rhs = m["rhs"]
        right = _value(table, *rhs.split(".", 1)) if rhs[0].isalpha() else float(rhs)
        missing = [
            ref
            for ref, v in ((f"{m['model']}.{m['metric']}", left), (rhs, right))
            if v is None and ref[0].isalpha()
        ]
        if missing:
            have = ", ".join(sorted(table)) or "none"
            detail = f"{', '.join(missing)} not in the table (models: {have})"
            results.append(GateResult(gate, False, left, right, detail))
            continue
        passed = bool(OPS[m["op"]](left, right))
        if not m["significant"]:
            results.append(GateResult(gate, passed, left, right))
            continue
        metric = ALIASES.get(m["metric"], m["metric"])
        right_model, right_metric = rhs.split(".", 1)
        p = None
        if p_value is not None and ALIASES.get(right_metric, right_metric) == metric:
            p = p_value(m["model"], right_model, metric)
        if p is None:
            detail = f"no paired per-row scores of {metric} for {m['model']} and {right_model}"
            results.append(GateResult(gate, False, left, right, detail))
            continue
        results.append(GateResult(gate, passed and p < alpha, left, right, p_value=p))
    return results


def describe(result: GateResult) -> str:
    state = "PASS" if result.passed else "FAIL"
    values = result.detail or f"{result.left:.6g} vs {result.right:.6g}"
    if result.p_value is not None:
        values += f", p={result.p_value:.3g}"
    return f"{state} {result.gate} ({values})"


def promote_or_fail(
    store: ArtifactStore, run_name: str, results: list[GateResult], newest: ArtifactRef
) -> dict[str, Any] | None:
    """Raise GateError naming every failed gate; else record `newest` as promoted."""
    failed = [r for r in results if not r.passed]
    if failed:
        raise GateError("promotion gates failed: " + "; ".join(describe(r) for r in failed))
    if not results:
        return None
    record = {
        "promoted": newest.key,
        "stage": newest.stage,
        "uri": newest.uri,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "gates": [asdict(r) for r in results],
    }
    path = f"{store.root}/{PROMOTED}"
    lock = store.scratch / "locks" / "promoted.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):  # read-modify-write: concurrent runs must not drop each other
        try:
            with store.fs.open(path, "rb") as f:
                promoted = json.loads(f.read())
        except FileNotFoundError:
            promoted = {}
        except json.JSONDecodeError as exc:  # never overwrite other runs' records blindly
            raise StoreError(f"{path}: not valid JSON ({exc}); fix or remove it") from exc
        promoted[run_name] = record
        data = json.dumps(promoted, indent=2, sort_keys=True).encode()
        if store.local:  # whole or old, never torn: write aside, then rename over
            tmp = Path(f"{path}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        else:  # an object PUT is atomic
            store.fs.pipe_file(path, data)
    return record


def run_gates(
    cfg: Any, table: list[dict[str, Any]], evals: dict[str, ArtifactRef] | None = None
) -> list[GateResult]:
    """check_gates with the paired tests of the evaluations' per-row scores (for `significant`)."""
    from fasttrack.lib.evalstats import load_scores, pvalue_fn
    from fasttrack.lib.stats import Bootstrap

    b = cfg.evaluate.bootstrap
    p_value = None
    if evals and any(GATE_RE.match(g)["significant"] for g in cfg.evaluate.gates):  # type: ignore[index]
        scores = load_scores(ArtifactStore(cfg.store), evals)
        p_value = pvalue_fn(scores, Bootstrap(b.resamples, b.seed, b.level))
    return check_gates(cfg.evaluate.gates, table, p_value, alpha=1 - b.level)


def enforce_gates(
    cfg: Any,
    table: list[dict[str, Any]],
    models: dict[str, ArtifactRef],
    evals: dict[str, ArtifactRef] | None = None,
) -> dict[str, Any] | None:
    """Fail the run on a failed gate; otherwise promote its newest model (DPO > SFT > ...) and
    return the promotion record (None: no gates, nothing promoted)."""
    from fasttrack.lib.chain import MODEL_ORDER

    results = run_gates(cfg, table, evals)
    newest = next((models[m] for m in MODEL_ORDER if m in models), None)
    if newest is None:
        return None
    return promote_or_fail(ArtifactStore(cfg.store), cfg.name, results, newest)
