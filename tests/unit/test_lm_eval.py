"""lm-evaluation-harness on a loaded tiny model with the shipped offline task."""

from pathlib import Path

import pytest

from fasttrack.core.config_eval import LmEvalConfig
from fasttrack.lib.evalstats import intervals
from fasttrack.lib.lm_eval_run import run_lm_eval
from fasttrack.lib.stats import Bootstrap

pytest.importorskip("lm_eval")  # the `eval` extra (in dev)


def test_shipped_task_runs_offline_on_the_loaded_model(tiny_model_dir: Path, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = LmEvalConfig(tasks=["fasttrack_stdlib_mc"], limit=6, batch_size=4)
    metrics, tables = run_lm_eval(model, tok, cfg, seed=0, workdir=tmp_path)
    acc = metrics["lm_eval.fasttrack_stdlib_mc.acc"]
    assert 0.0 <= acc <= 1.0 and metrics["lm_eval.fasttrack_stdlib_mc.rows"] == 6
    rows = tables["lm_eval.fasttrack_stdlib_mc"]
    assert rows["columns"][0] == "lm_eval.fasttrack_stdlib_mc.acc" and len(rows["rows"]) == 6
    assert sum(r[0] for r in rows["rows"]) / 6 == pytest.approx(acc, abs=1e-6)  # per doc
    low, high = intervals(tables, Bootstrap(200))["lm_eval.fasttrack_stdlib_mc.acc"]
    assert low <= acc <= high
