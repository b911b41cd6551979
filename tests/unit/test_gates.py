import json

import pytest

from fasttrack.core.config_loader import load_config
from fasttrack.core.errors import ConfigError
from fasttrack.core.store import ArtifactRef, ArtifactStore
from fasttrack.lib.gates import GateError, check_gates, describe, promote_or_fail
from tests.conftest import tiny_config_dict, write_config

TABLE = [
    {"model": "base", "perplexity": 4000.0, "rougeL": 0.01, "pref_accuracy": 0.5},
    {"model": "sft", "perplexity": 300.0, "rougeL": 0.12, "pref_accuracy": 0.55},
]


def test_gates_compare_models_and_numbers_with_aliases() -> None:
    results = check_gates(
        [
            "sft.perplexity < base.perplexity",
            "sft.rouge_l >= base.rougeL",
            "sft.pref_accuracy >= 0.6",
        ],
        TABLE,
    )
    assert [r.passed for r in results] == [True, True, False]
    assert describe(results[2]) == "FAIL sft.pref_accuracy >= 0.6 (0.55 vs 0.6)"


def test_missing_model_or_metric_fails_the_gate_and_says_why() -> None:
    (result,) = check_gates(["dpo.bleu > 0"], TABLE)
    assert not result.passed and "dpo.bleu not in the table (models: base, sft)" in result.detail


def test_fail_names_every_failed_gate_and_pass_promotes(tmp_path) -> None:
    store = ArtifactStore(tmp_path / "s")
    newest = ArtifactRef(stage="sft", key="a" * 64, uri="u")
    bad = check_gates(["sft.pref_accuracy >= 0.6", "base.rougeL > sft.rougeL"], TABLE)
    with pytest.raises(
        GateError, match=r"FAIL sft.pref_accuracy >= 0.6 \(0.55 vs 0.6\); FAIL base"
    ):
        promote_or_fail(store, "run-x", bad, newest)
    assert not (tmp_path / "s" / "promoted.json").exists()
    good = check_gates(["sft.perplexity < base.perplexity"], TABLE)
    promote_or_fail(store, "run-x", good, newest)
    promoted = json.loads((tmp_path / "s" / "promoted.json").read_text())
    assert promoted["run-x"]["promoted"] == "a" * 64 and promoted["run-x"]["gates"][0]["passed"]


def test_concurrent_promotions_keep_every_run_and_corrupt_file_is_not_overwritten(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from fasttrack.core.errors import StoreError

    store = ArtifactStore(tmp_path / "s")
    good = check_gates(["sft.perplexity < base.perplexity"], TABLE)
    newest = ArtifactRef(stage="sft", key="b" * 64, uri="u")
    names = [f"run-{i}" for i in range(12)]
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda n: promote_or_fail(store, n, good, newest), names))
    promoted = json.loads((tmp_path / "s" / "promoted.json").read_text())
    assert sorted(promoted) == sorted(names)  # no lost update
    (tmp_path / "s" / "promoted.json").write_text('{"run-0": ')
    with pytest.raises(StoreError, match="promoted.json: not valid JSON"):
        promote_or_fail(store, "run-x", good, newest)
    assert (tmp_path / "s" / "promoted.json").read_text() == '{"run-0": '


def test_malformed_gate_is_a_config_error(tmp_path) -> None:
    d = tiny_config_dict(tmp_path / "s")
    d["evaluate"]["gates"] = ["sft.rougeL is better"]
    with pytest.raises(ConfigError, match=r"evaluate: gates.0: 'sft.rougeL is better' is not"):
        load_config(write_config(tmp_path / "c.yaml", d))


def test_significant_gate_needs_the_paired_test_to_pass(tmp_path) -> None:
    """`significant`: the comparison must hold *and* the paired test on the same rows give
    p < alpha; with no per-row scores the gate fails, saying why."""
    import numpy as np

    from fasttrack.lib.evalstats import pvalue_fn, table
    from fasttrack.lib.stats import Bootstrap

    rng = np.random.default_rng(0)
    base = rng.random(40)

    def gen(rows):
        return {"generation": table(["rougeL"], [[v] for v in rows])}

    scores = {"base": gen(base), "sft": gen(base + 0.1), "dpo": gen(base + rng.normal(0, 0.01, 40))}
    rows = [{"model": m, "rougeL": float(np.mean(s["generation"]["rows"]))} for m, s in
            scores.items()]  # fmt: skip
    p = pvalue_fn(scores, Bootstrap(500, seed=0))
    gates = ["sft.rougeL > base.rougeL significant", "dpo.rougeL > base.rougeL significant"]
    planted, noise = check_gates(gates, rows, p)
    assert planted.passed and planted.p_value < 0.05
    assert describe(planted).startswith("PASS sft.rougeL > base.rougeL significant (")
    assert "p=0.002" in describe(planted)
    assert not noise.passed and noise.p_value > 0.05  # higher, but not significantly
    (unscored,) = check_gates(gates[:1], rows)
    assert not unscored.passed and "no paired per-row scores of rougeL" in unscored.detail
    d = tiny_config_dict(tmp_path / "s")
    d["evaluate"]["gates"] = ["sft.rougeL > 0.1 significant"]
    with pytest.raises(ConfigError, match=r"gates.0: .*the right side must be `<model>.<metric>`"):
        load_config(write_config(tmp_path / "c.yaml", d))
    d["evaluate"]["gates"] = gates
    assert load_config(write_config(tmp_path / "c.yaml", d)).evaluate.gates == gates
