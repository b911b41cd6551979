"""Two recorded runs side by side: what differs in their configs and in their metrics.

A run is recorded in the store by its report artifact (its `summary` holds the metrics table).
Its config is what its artifacts were keyed on: the report's upstream artifacts and theirs,
each manifest's `config` under its stage name (`dpo.beta`, `pretrain.max_steps`, ...), so
the diff shows exactly the settings that changed a result, from the store alone.
"""

from __future__ import annotations

from typing import Any

from fasttrack.core.store import ArtifactStore
from fasttrack.lib.tracking import flatten


def keyed_config(store: ArtifactStore, report: dict[str, Any]) -> dict[str, Any]:
    """`stage.field -> value` over every artifact the report was built from (transitively)."""
    by_key = {m["key"]: m for m in store.manifests()}
    out: dict[str, Any] = {}
    todo, seen = list(report.get("upstream", {}).values()), set()
    while todo:
        key = todo.pop()
        if key in seen or key not in by_key:
            continue
        seen.add(key)
        manifest = by_key[key]
        for field, value in flatten(manifest.get("config", {})).items():
            out[f"{manifest['stage']}.{field}"] = value
        todo += list(manifest.get("upstream", {}).values())
    return out


def run_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """`model.metric -> value` of the run's evaluation table."""
    out = {}
    for row in report.get("summary", {}).get("table", []):
        for col, value in row.items():
            if col not in ("model", "small_n", "eval_key") and value is not None:
                out[f"{row['model']}.{col}"] = value
    return out


def diff(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows `field, a, b[, delta]` for every field whose values differ (absent: None)."""
    rows = []
    for field in sorted(set(a) | set(b)):
        va, vb = a.get(field), b.get(field)
        if va == vb:
            continue
        row: dict[str, Any] = {"field": field, "a": va, "b": vb}
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (va, vb))
        row["delta"] = vb - va if numbers else None
        rows.append(row)
    return rows
