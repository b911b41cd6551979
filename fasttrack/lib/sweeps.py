"""Sweep points and their comparison: pure functions the sweep flow and CLI share.

A point is a set of `--set` overrides (field path -> value). Grid: every combination of the
listed values; random: `samples` draws with `seed` (a list is a choice, {low, high, log} a range).
The comparison table has one row per point: its config delta, then the metrics of the run's
newest model (with an interval where the metric carries `<name>_ci_low/_ci_high`).
"""

from __future__ import annotations

import itertools
import json
import math
import random
from typing import Any

import yaml

from fasttrack.core.config_track import RandomSpace, SweepConfig
from fasttrack.core.errors import ConfigError
from fasttrack.lib.tables import TABLE_COLUMNS

LOWER_IS_BETTER = ("loss", "perplexity", "bits_per_byte")


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """`--grid dpo.beta=0.05,0.1` -> {"dpo.beta": [0.05, 0.1]} (values parsed as YAML, like
    `--set`; a value that is itself a list is written in brackets: `x=[a,b],[c]` is not split)."""
    out: dict[str, list[Any]] = {}
    for item in items:
        field, sep, text = item.partition("=")
        field = field.strip()
        if not sep or not field or not text.strip():
            raise ConfigError(f"--grid {item}: expected FIELD=V1,V2,..., e.g. dpo.beta=0.05,0.1")
        try:
            values = yaml.safe_load(f"[{text}]")
        except yaml.YAMLError as exc:
            raise ConfigError(f"--grid {item}: cannot parse the values ({exc})") from None
        if field in out:
            raise ConfigError(f"--grid {field}: given twice")
        out[field] = values
    return out


def points(sweep: SweepConfig, grid: dict[str, list[Any]] | None = None) -> list[dict[str, Any]]:
    """The sweep's points (field -> value), in a stable order. `grid` (from the CLI) adds to and
    overrides `sweep.params` and implies grid mode unless the section says random."""
    params: dict[str, Any] = {**sweep.params, **(grid or {})}
    if not params:
        raise ConfigError("sweep: no parameters (use --grid FIELD=V1,V2 or a `sweep.params` map)")
    if sweep.mode == "grid":
        names = list(params)
        combos = itertools.product(*(params[n] for n in names))
        return [dict(zip(names, combo, strict=True)) for combo in combos]
    rng = random.Random(sweep.seed)
    return [{name: _draw(rng, space) for name, space in params.items()}
            for _ in range(sweep.samples)]  # fmt: skip


def _draw(rng: random.Random, space: list[Any] | RandomSpace) -> Any:
    if isinstance(space, list):
        return rng.choice(space)
    if space.log:
        value = math.exp(rng.uniform(math.log(space.low), math.log(space.high)))
    else:
        value = rng.uniform(space.low, space.high)
    return float(f"{value:.4g}")  # readable configs and table cells


def overrides(point: dict[str, Any]) -> list[str]:
    """The point as `--set` strings (JSON values are valid YAML flow values)."""
    return [f"{name}={json.dumps(value)}" for name, value in point.items()]


def point_name(base: str, i: int) -> str:
    return f"{base}-sweep{i:02d}"


def point_sets(base: list[str], point: dict[str, Any], name: str) -> list[str]:
    """The `--set` list of one point: the sweep's own overrides, the point, its run name."""
    return [*base, *overrides(point), f"name={name}"]


def check_points(config: str | None, base: list[str], pts: list[dict[str, Any]], name: str):
    """Validate every point's config before any runs; the error names the point and field."""
    from fasttrack.core.config_loader import load_config

    for i, point in enumerate(pts):
        try:
            load_config(config, point_sets(base, point, point_name(name, i)))
        except ConfigError as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError(f"sweep point {i} ({_show(point)}): {first}") from None


def _show(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items())


def point_metrics(table: list[dict[str, Any]], newest: str | None) -> dict[str, Any]:
    """The metrics of the newest model's row (and `<model>.<metric>` of every row, so --metric
    can name another model's column)."""
    out: dict[str, Any] = {}
    for row in table:
        model = row.get("model")
        values = {c: v for c, v in row.items() if c not in ("model", "small_n", "eval_key", "ci")}
        for col, (low, high) in (row.get("ci") or {}).items():  # the table's bootstrap intervals
            values |= {f"{col}_ci_low": low, f"{col}_ci_high": high}
        for col, value in values.items():
            if value is not None:
                out[f"{model}.{col}"] = value
                if model == newest:
                    out[col] = value
    return out


def comparison(
    rows: list[dict[str, Any]], fields: list[str]
) -> tuple[list[dict[str, Any]], list[str]]:
    """(table rows, metric columns): point, each swept field, then each metric any point has
    (newest model; `v [lo, hi]` cells where the metric has an interval)."""
    metrics = [c for c in TABLE_COLUMNS if any(r["metrics"].get(c) is not None for r in rows)]
    out = []
    for r in rows:
        row: dict[str, Any] = {"point": r["point"]}
        row |= {f: r["delta"].get(f) for f in fields}
        row |= {m: cell(r["metrics"], m) for m in metrics}
        row["executed"] = r["executed"]
        out.append(row)
    return out, metrics


def cell(metrics: dict[str, Any], name: str) -> Any:
    value = metrics.get(name)
    low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
    if isinstance(value, int | float) and isinstance(low, int | float) and high is not None:
        return f"{value:.4g} [{low:.4g}, {high:.4g}]"
    return value


def goal_of(metric: str, goal: str = "auto") -> str:
    if goal != "auto":
        return goal
    return "min" if any(word in metric for word in LOWER_IS_BETTER) else "max"


def best_point(rows: list[dict[str, Any]], metric: str, goal: str = "auto") -> dict | None:
    """The row whose `metric` is best (None when no point has it)."""
    scored = [r for r in rows if isinstance(r["metrics"].get(metric), int | float)]
    if not scored:
        return None
    pick = min if goal_of(metric, goal) == "min" else max
    return pick(scored, key=lambda r: r["metrics"][metric])
