import json
from pathlib import Path

import torch

from fasttrack.lib.training import last_checkpoint
from tasks.pretrain import collate_blocks, pretrain_spec


def _checkpoint(work: Path, step: int, complete: bool = True, optimizer="optimizer.pt") -> Path:
    path = work / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"w")
    if complete:
        (path / optimizer).write_bytes(b"o")
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_resume_picks_newest_complete_checkpoint_and_drops_half_written(tmp_path: Path) -> None:
    assert last_checkpoint(tmp_path / "none") == (None, 0)
    _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 20)
    half = _checkpoint(tmp_path, 30, complete=False)  # killed while saving
    torn = _checkpoint(tmp_path, 40)
    (torn / "trainer_state.json").write_text('{"global_st')  # killed mid-write
    path, step = last_checkpoint(tmp_path)
    assert step == 20 and path == str(tmp_path / "checkpoint-20")
    assert not half.exists() and not torn.exists()


def test_fsdp_checkpoints_count_as_complete(tmp_path: Path) -> None:
    """Under FSDP (full state dict) the Trainer writes the optimizer as optimizer.bin: such a
    checkpoint resumes rather than being deleted."""
    _checkpoint(tmp_path, 5, optimizer="optimizer.bin")
    assert last_checkpoint(tmp_path)[1] == 5


def test_collate_masks_padding_out_of_the_loss() -> None:
    batch = collate_blocks([{"input_ids": [5, 6, 0, 0], "attention_mask": [1, 1, 0, 0]}])
    assert batch["labels"].tolist() == [[5, 6, -100, -100]]
    assert batch["attention_mask"].dtype == torch.long


def test_logging_knobs_do_not_change_the_key(tiny_cfg) -> None:
    from fasttrack.core.store import ArtifactRef

    ref = ArtifactRef(stage="pack", key="a" * 64, uri="x")
    base = ArtifactRef(stage="base", key="b" * 64, uri="y")
    key = pretrain_spec(tiny_cfg, ref, base).key
    quieter = tiny_cfg.model_copy(
        update={
            "pretrain": tiny_cfg.pretrain.model_copy(update={"logging_steps": 99, "save_steps": 7})
        }
    )
    assert pretrain_spec(quieter, ref, base).key == key
    slower = tiny_cfg.model_copy(
        update={"pretrain": tiny_cfg.pretrain.model_copy(update={"learning_rate": 1e-4})}
    )
    assert pretrain_spec(slower, ref, base).key != key
