"""lm-evaluation-harness on a loaded tiny model with the shipped offline task."""

from pathlib import Path

import pytest

from fasttrack.core.config_eval import LmEvalConfig
from fasttrack.core.errors import ModelError
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
    assert sum(r[0] for r in rows["rows"]) / 6 == pytest.approx(acc)  # per-document = harness
    low, high = intervals(tables, Bootstrap(200))["lm_eval.fasttrack_stdlib_mc.acc"]
    assert low <= acc <= high
    with pytest.raises(ModelError, match="unknown task.*no_such_task"):
        run_lm_eval(model, tok, LmEvalConfig(tasks=["no_such_task"]), 0, tmp_path / "x")
