"""Sweep points, the comparison table, the best point, the per-field plot and run diffs."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from fasttrack.core.config_loader import load_config
from fasttrack.core.config_track import SweepConfig
from fasttrack.core.errors import ConfigError
from fasttrack.lib.compare import diff
from fasttrack.lib.plots import metric_vs_field
from fasttrack.lib.sweeps import best_point, comparison, overrides, parse_grid, points
from tests.conftest import tiny_config_dict, write_config


def test_grid_is_every_combination_and_overrides_round_trip(tmp_path: Path) -> None:
    grid = parse_grid(["dpo.beta=0.05,0.1,0.2", "adapter.lora.r=8,16"])
    assert grid == {"dpo.beta": [0.05, 0.1, 0.2], "adapter.lora.r": [8, 16]}
    pts = points(SweepConfig(), grid)
    assert len(pts) == 6 and {"dpo.beta": 0.2, "adapter.lora.r": 16} in pts
    path = write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path / "s"))
    cfg = load_config(path, overrides(pts[-1]))  # what --set accepts, typed as the schema says
    assert cfg.dpo.beta == 0.2 and cfg.adapter.lora.r == 16


def test_grid_from_the_yaml_section_and_the_cli_merge(tmp_path: Path) -> None:
    sweep = {"params": {"dpo.beta": [0.1, 0.2], "sft.learning_rate": [0.001]}}
    path = write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path / "s", sweep=sweep))
    cfg = load_config(path)
    pts = points(cfg.sweep, parse_grid(["dpo.beta=0.3"]))  # the CLI's values win per field
    assert pts == [{"dpo.beta": 0.3, "sft.learning_rate": 0.001}]


def test_random_search_is_seeded_and_stays_in_range() -> None:
    sweep = SweepConfig(
        mode="random", samples=5, seed=3,
        params={"dpo.beta": {"low": 0.01, "high": 1.0, "log": True}, "adapter.lora.r": [8, 16]},
    )  # fmt: skip
    a, b = points(sweep), points(sweep)
    assert a == b and len(a) == 5
    assert all(0.01 <= p["dpo.beta"] <= 1.0 and p["adapter.lora.r"] in (8, 16) for p in a)
    assert len({p["dpo.beta"] for p in a}) == 5
    assert points(sweep.model_copy(update={"seed": 4})) != a


@pytest.mark.parametrize(
    ("items", "match"),
    [
        (["dpo.beta"], "expected FIELD=V1,V2"),
        (["dpo.beta=0.1", "dpo.beta=0.2"], "given twice"),
        ([], "no parameters"),
    ],
)
def test_bad_grids_say_what_is_wrong(items: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        points(SweepConfig(), parse_grid(items))


def test_a_range_needs_random_mode(tmp_path: Path) -> None:
    sweep = {"params": {"dpo.beta": {"low": 0.1, "high": 0.2}}}
    path = write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path / "s", sweep=sweep))
    with pytest.raises(ConfigError, match=r"sweep: params\.dpo\.beta: a range needs mode: random"):
        load_config(path)


ROWS = [
    {"point": "p0", "delta": {"dpo.beta": 0.05}, "executed": 9,
     "metrics": {"pref_accuracy": 0.5, "perplexity": 30.0, "perplexity_ci_low": 28.0,
                 "perplexity_ci_high": 33.0}},
    {"point": "p1", "delta": {"dpo.beta": 0.1}, "executed": 2,
     "metrics": {"pref_accuracy": 0.75, "perplexity": 31.0}},
    {"point": "p2", "delta": {"dpo.beta": 0.2}, "executed": 2,
     "metrics": {"pref_accuracy": 0.625, "perplexity": 29.0}},
]  # fmt: skip


def test_comparison_table_shows_deltas_metrics_and_intervals() -> None:
    table, metrics = comparison(ROWS, ["dpo.beta"])
    assert metrics == ["perplexity", "pref_accuracy"]
    assert table[0] == {"point": "p0", "dpo.beta": 0.05, "perplexity": "30 [28, 33]",
                        "pref_accuracy": 0.5, "executed": 9}  # fmt: skip
    assert table[1]["perplexity"] == 31.0


def test_best_point_by_metric_and_direction() -> None:
    assert best_point(ROWS, "pref_accuracy")["point"] == "p1"  # higher is better
    assert best_point(ROWS, "perplexity")["point"] == "p2"  # lower is better
    assert best_point(ROWS, "perplexity", "max")["point"] == "p1"
    assert best_point(ROWS, "rouge1") is None


def test_metric_vs_field_plot(tmp_path: Path) -> None:
    path = metric_vs_field(ROWS, "dpo.beta", ["pref_accuracy", "perplexity"], tmp_path / "b.png")
    with Image.open(path) as img:
        assert img.size == (960, 360)  # two panels
    with pytest.raises(ValueError, match="nothing|no metric"):
        metric_vs_field(ROWS, "dpo.beta", ["bleu"], tmp_path / "c.png")


def test_diff_lists_only_what_differs_with_numeric_deltas() -> None:
    rows = diff({"dpo.beta": 0.1, "sft.r": 8, "x": "a"}, {"dpo.beta": 0.2, "sft.r": 8, "y": 1})
    assert [r["field"] for r in rows] == ["dpo.beta", "x", "y"]
    assert rows[0]["delta"] == pytest.approx(0.1) and rows[1]["delta"] is None


def test_point_metrics_carry_the_tables_intervals_into_the_comparison() -> None:
    from fasttrack.lib.sweeps import cell, point_metrics

    table = [{"model": "dpo", "rougeL": 0.25, "small_n": "", "ci": {"rougeL": [0.2, 0.3]}}]
    got = point_metrics(table, "dpo")
    assert got["rougeL_ci_low"] == 0.2 and got["dpo.rougeL_ci_high"] == 0.3 and "ci" not in got
    assert cell(got, "rougeL") == "0.25 [0.2, 0.3]"
