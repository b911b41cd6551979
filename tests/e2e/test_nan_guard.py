"""A NaN loss in a real pipeline run: abort publishes nothing and names stage + step; skip
publishes a model that missed the poisoned step and says so in its manifest."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fasttrack.core.store import ArtifactStore
from flows.cli import app
from tests.conftest import tiny_config_dict, write_config
from tests.e2e.bad_inputs import NAN_CASE

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_harness")]
POISONED_STEP = 3


@pytest.fixture
def poisoned_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """The training loss of step 3 is NaN (as after an overflow), in every trainer."""
    from transformers import Trainer

    original = Trainer.compute_loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = original(self, model, inputs, *args, **kwargs)
        poisoned = model.training and self.state.global_step + 1 == POISONED_STEP
        if not poisoned:
            return loss
        return (loss * float("nan"), *loss[1:]) if isinstance(loss, tuple) else loss * float("nan")

    monkeypatch.setattr(Trainer, "compute_loss", compute_loss)


@pytest.mark.usefixtures("poisoned_loss")
def test_nan_loss_aborts_or_skips_the_step(tmp_path: Path) -> None:
    d = tiny_config_dict(tmp_path / "store")
    d["pretrain"] |= {"max_steps": 6, "eval_steps": 3, "save_steps": 3, "logging_steps": 1}
    # In-process training: the poisoned Trainer is a monkeypatch of this process. (A
    # FastTrackError from a training child reaches the CLI the same way: test_isolation.)
    d["compute"] = {"isolate": False}
    cfg = str(write_config(tmp_path / "run.yaml", d))
    store = ArtifactStore(tmp_path / "store")

    result = CliRunner().invoke(app, ["run", cfg, "--stages", "pretrain"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert NAN_CASE.pattern("pretrain").fullmatch(errors[0].removeprefix("error: ")), errors
    assert f"at step {POISONED_STEP};" in errors[0]
    assert "pretrain" not in {m["stage"] for m in store.manifests()}

    skip = ["run", cfg, "--stages", "pretrain", "--set", "pretrain.nan_policy=skip"]
    result = CliRunner().invoke(app, skip)
    assert result.exit_code == 0, result.output
    (manifest,) = [m for m in store.manifests() if m["stage"] == "pretrain"]
    assert manifest["metrics"]["skipped_steps"] == 1 and manifest["metrics"]["steps"] == 6
    assert manifest["config"]["nan_policy"] == "skip"
