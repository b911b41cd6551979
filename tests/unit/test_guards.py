"""Non-finite loss guard: abort names stage and step; skip makes the poisoned step a no-op."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fasttrack.core.config import TrainingConfig
from fasttrack.lib.guards import TrainingError
from fasttrack.lib.training import run_trainer, trainer_kwargs, training_key_config
from tasks.pretrain import collate_blocks


class Snapshots:
    """Weights after every optimizer step, keyed by global step."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.by_step[state.global_step] = {
            n: p.detach().clone() for n, p in model.named_parameters()
        }


def _trainer(
    tmp_path: Path, section: TrainingConfig, poison_steps: set[int], grads=False, evals=False
):
    """A 1-layer Llama on random blocks; the loss (or the gradients) of `poison_steps` is NaN.
    `evals`: with 16 held-out random blocks, evaluated every `section.eval_steps`."""
    import datasets
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    )  # fmt: skip
    ids = torch.randint(0, 64, (64, 16))
    train = datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )
    held_out = train.select(range(16)) if evals else None
    args = TrainingArguments(
        **trainer_kwargs(section, tmp_path / "work", seed=0, has_eval=evals),
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=train, eval_dataset=held_out,
        data_collator=collate_blocks,
    )  # fmt: skip
    original = trainer.compute_loss

    def poisoned(model, inputs, *a, **kw):
        loss = original(model, inputs, *a, **kw)
        bad = model.training and trainer.state.global_step + 1 in poison_steps
        return loss * float("nan") if bad and not grads else loss

    trainer.compute_loss = poisoned
    if grads:  # finite loss, infinite gradient on one weight
        weight = model.model.layers[0].mlp.down_proj.weight
        weight.register_hook(
            lambda g: g * float("inf") if trainer.state.global_step + 1 in poison_steps else g
        )
    snaps = Snapshots()
    trainer.add_callback(type("Snap", (TrainerCallback,), {"on_step_end": snaps.on_step_end}))
    return trainer, snaps


def _section(**kw) -> TrainingConfig:
    base = {"max_steps": 6, "per_device_batch_size": 4, "learning_rate": 1e-2,
            "logging_steps": 1, "save_steps": 100, "warmup_ratio": 0.0}  # fmt: skip
    return TrainingConfig(**(base | kw))


def test_abort_names_stage_and_step(tmp_path: Path) -> None:
    trainer, snaps = _trainer(tmp_path, _section(), poison_steps={3})
    with pytest.raises(TrainingError, match=r"^pretrain: loss is nan at step 3; nothing published"):
        run_trainer(trainer, "pretrain", tmp_path / "work", tmp_path / "out", section=_section())
    assert sorted(snaps.by_step) == [1, 2]  # stopped before step 3's optimizer update
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_abort_on_non_finite_gradients(tmp_path: Path) -> None:
    trainer, _ = _trainer(tmp_path, _section(), poison_steps={2}, grads=True)
    with pytest.raises(TrainingError, match=r"^sft: gradients are not finite at step 2"):
        run_trainer(trainer, "sft", tmp_path / "work", tmp_path / "out")  # default: abort


def test_skip_makes_the_poisoned_step_a_no_op(tmp_path: Path) -> None:
    section = _section(nan_policy="skip", gradient_accumulation_steps=2)
    trainer, snaps = _trainer(tmp_path, section, poison_steps={3})
    metrics = run_trainer(trainer, "pretrain", tmp_path / "work", tmp_path / "out", section=section)
    assert metrics["steps"] == 6 and metrics["skipped_steps"] == 1
    assert metrics["train_cpu_seconds"] > 0  # process CPU time of train(), for loaded machines
    for step in (2, 4):  # the steps around the skipped one did update the weights
        before, after = snaps.by_step[step - 1], snaps.by_step[step]
        assert any(not torch.equal(before[n], after[n]) for n in after)
    before, after = snaps.by_step[2], snaps.by_step[3]
    assert all(torch.equal(before[n], after[n]) for n in after)  # step 3: no update at all
    final = snaps.by_step[6]
    assert all(torch.isfinite(t).all() for t in final.values())
    assert metrics["train_loss"] == metrics["train_loss"]  # not NaN: the filter kept it finite
    state = next(iter(trainer.optimizer.state.values()))
    assert int(state["step"]) == 5  # AdamW moments skipped step 3 as well


def test_skip_gives_up_over_the_limit(tmp_path: Path) -> None:
    section = _section(nan_policy="skip", max_skipped_steps=2)
    trainer, _ = _trainer(tmp_path, section, poison_steps={2, 3, 4, 5})
    with pytest.raises(TrainingError, match=r"3 steps skipped, over max_skipped_steps \(2\)"):
        run_trainer(trainer, "dpo", tmp_path / "work", tmp_path / "out", section=section)


def test_guard_knobs_enter_the_key_only_when_they_can_change_the_result() -> None:
    default = training_key_config(_section(), 0)
    assert "nan_policy" not in default  # existing keys stay valid
    assert training_key_config(_section(max_skipped_steps=3), 0) == default
    skip = training_key_config(_section(nan_policy="skip"), 0)
    assert skip["nan_policy"] == "skip" and skip != default


def test_verdict_is_collective_and_reads_sharded_gradients(tmp_path: Path) -> None:
    """Under FSDP each rank holds a shard: rank 0's shard is finite, rank 1's is not. Every rank
    must reach the same verdict, or one would skip/abort while the other waits in a collective."""
    import json

    import torch.multiprocessing as mp

    from fasttrack.core.compute import free_port
    from tests.unit.rank_verdicts import verdicts

    mp.spawn(verdicts, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)  # fresh ranks
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["local_only"] is True and r1["local_only"] is False  # shards differ locally
    assert r0["across_ranks"] is False and r1["across_ranks"] is False  # one verdict
    assert r0["finite_across"] is True and r1["finite_across"] is True
    assert r0["loss_grads"] == r1["loss_grads"] == [False, True]


def _counted(trainer) -> tuple[list[int], object]:
    calls: list[int] = []
    real = trainer.evaluate
    trainer.evaluate = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    return calls, real


@pytest.mark.parametrize(("eval_steps", "passes"), [(2, 3), (3, 2), (4, 2)])
def test_the_last_steps_evaluation_is_not_run_twice(tmp_path, eval_steps, passes) -> None:
    """6 steps evaluated every 2, 3 or 4 (the Trainer also evaluates the last step): that
    in-loop pass at step 6 is the final one, not followed by a second pass over the same
    weights; eval_loss is the trained model's."""
    trainer, _ = _trainer(tmp_path, _section(eval_steps=eval_steps), set(), evals=True)
    calls, real = _counted(trainer)
    metrics = run_trainer(trainer, "pretrain", tmp_path / "work", tmp_path / "out")
    assert len(calls) == passes
    assert metrics["eval_loss"] == round(real()["eval_loss"], 5)


def test_a_final_evaluation_runs_when_the_loop_did_not_evaluate_the_last_step(tmp_path) -> None:
    trainer, _ = _trainer(tmp_path, _section(eval_steps=2), set(), evals=True)
    trainer.args.eval_strategy = "no"  # held-out data, but no in-loop evaluation
    calls, real = _counted(trainer)
    metrics = run_trainer(trainer, "pretrain", tmp_path / "work", tmp_path / "out")
    assert len(calls) == 1
    assert metrics["eval_loss"] == round(real()["eval_loss"], 5)
