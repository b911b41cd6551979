"""Resuming a training run from its checkpoints ends at max_steps, never past it."""

from __future__ import annotations

import json
from pathlib import Path

from fasttrack.lib.training import last_checkpoint, run_trainer
from tests.unit.test_guards import _section, _trainer
from tests.unit.test_pretrain_unit import _checkpoint


def test_checkpoints_at_or_past_max_steps_are_not_resumed_from(tmp_path: Path) -> None:
    for step in (2, 4, 6):
        _checkpoint(tmp_path, step)
    assert last_checkpoint(tmp_path, below=4) == (str(tmp_path / "checkpoint-2"), 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]


def test_a_run_killed_after_its_final_checkpoint_resumes_to_max_steps(tmp_path: Path) -> None:
    """A 6-step run saves at 3 and 6, then (as if killed before publishing) runs again on the
    same work dir: it retrains steps 4-6 from checkpoint-3 and ends at step 6 (the Trainer
    alone, resumed from checkpoint-6, would train a step 7) with the first run's weights."""
    section = _section(save_steps=3)
    first, _ = _trainer(tmp_path, section, set())
    run_trainer(first, "pretrain", tmp_path / "work", tmp_path / "out1", section=section)
    assert (tmp_path / "work" / "checkpoint-6").is_dir()
    again, snaps = _trainer(tmp_path, section, set())
    metrics = run_trainer(again, "pretrain", tmp_path / "work", tmp_path / "out2", section=section)
    assert metrics["steps"] == 6 and metrics["resumed_from_step"] == 3
    assert sorted(snaps.by_step) == [4, 5, 6]
    state = json.loads((tmp_path / "work" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    one, two = (Path(tmp_path, d, "model.safetensors").read_bytes() for d in ("out1", "out2"))
    assert one == two
