"""QLoRA SFT and DPO on a tiny model, through the flow: real effects, stock loading, caching."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fasttrack.core.config_loader import load_config
from fasttrack.core.store import ArtifactStore
from flows.pipeline import PipelineParams, pipeline
from tests.conftest import tiny_config_dict, write_config

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_harness")]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, prefect_harness):
    tmp = tmp_path_factory.mktemp("sftdpo")
    path = write_config(tmp / "c.yaml", tiny_config_dict(tmp / "store"))
    summary = pipeline(PipelineParams(config=str(path), stages=["data", "pretrain", "sft", "dpo"]))
    cfg = load_config(path)
    store = ArtifactStore(cfg.store)
    refs = {s.step: store.lookup(s.step, s.key) for s in summary.steps}
    return path, cfg, store, refs


def _lora(dir_: Path) -> dict[str, torch.Tensor]:
    return load_file(str(dir_ / "adapter_model.safetensors"))


def test_sft_is_real_qlora_and_learns(run) -> None:
    _, _, _, refs = run
    m = refs["sft"].metrics
    assert m["quantization"] == "4bit-nf4+double-quant"  # real 4-bit on CPU, not a fallback
    assert m["trainable_tensors"] > 0 and m["trainable_tensors_unchanged"] == 0
    assert m["eval_loss"] < m["eval_loss_before"]  # held-out completion loss went down
    lora = _lora(Path(refs["sft"].uri))
    b = [t for n, t in lora.items() if "lora_B" in n]
    assert b and all(t.abs().sum() > 0 for t in b)  # B starts at zero: every one moved


def test_adapters_load_in_stock_peft_and_merged_model_generates(run) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import pipeline as hf_pipeline

    _, _, _, refs = run
    base_dir = refs["pretrain"].uri
    for stage in ("sft", "dpo"):
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        model = PeftModel.from_pretrained(base, refs[stage].uri)
        assert model.active_adapter == "default"
    merged = Path(refs["sft"].uri) / "merged"
    gen = hf_pipeline("text-generation", model=str(merged), tokenizer=str(merged), device="cpu")
    out = gen("What does `json.dumps` do?", max_new_tokens=8, do_sample=False)
    assert out[0]["generated_text"].startswith("What does `json.dumps` do?")
    tok = AutoTokenizer.from_pretrained(str(merged))
    assert tok.chat_template and tok.eos_token == "<|endoftext|>"


def test_dpo_changes_every_adapter_tensor_again_and_uses_stored_reference(run) -> None:
    _, _, _, refs = run
    m = refs["dpo"].metrics
    assert m["trainable_tensors_unchanged"] == 0
    assert m["ref_forward_batches"] == 0  # reference log-probs came from the dpo_ref artifact
    assert refs["dpo_ref"].metrics["ref_forward_batches"] > 0
    sft, dpo = _lora(Path(refs["sft"].uri)), _lora(Path(refs["dpo"].uri))
    assert sft.keys() == dpo.keys()
    assert all(not torch.equal(sft[k], dpo[k]) for k in sft)
    for key in ("pref_accuracy", "pref_accuracy_sft", "rewards/accuracies", "rewards/margins"):
        assert key in m


def test_changing_beta_reuses_reference_logprobs(run) -> None:
    path, _, _, refs = run
    params = PipelineParams(
        config=str(path), stages=["data", "pretrain", "sft", "dpo"], overrides=["dpo.beta=0.3"]
    )
    summary = pipeline(params)
    status = {s.step: s.status for s in summary.steps}
    assert status["dpo_ref"] == "cached" and status["sft"] == "cached"
    assert status["dpo"] == "executed"
    dpo = next(s for s in summary.steps if s.step == "dpo")
    assert dpo.key != refs["dpo"].key and dpo.metrics["ref_forward_batches"] == 0


def test_eos_is_in_the_trained_labels(run) -> None:
    """The chat template closes each answer with EOS; it must be inside the loss mask."""
    import datasets

    from fasttrack.lib.adapters import load_for_training
    from fasttrack.lib.datasets import read_split
    from tasks.sft import prompt_completion, sft_trainer

    _, cfg, store, refs = run
    rows = prompt_completion(read_split(store, refs["data"], "sft", "train")[:4])
    model, tok, _ = load_for_training(cfg, refs["pretrain"])
    train = datasets.Dataset.from_list(rows)
    trainer = sft_trainer(cfg, model, tok, train, None, store.scratch / "eos-check")
    example = trainer.train_dataset[0]  # TRL folds its masks into `labels` (-100 = no loss)
    trained = [t for t in example["labels"] if t != -100]
    untrained = [
        t for t, lab in zip(example["input_ids"], example["labels"], strict=True) if lab == -100
    ]
    assert tok.eos_token_id in trained  # EOS after the answer is trained: the model learns to stop
    assert tok.decode(trained).startswith(rows[0]["completion"][0]["content"][:10])
    assert tok.eos_token_id in untrained  # the user turn ends in EOS too, but is not trained
