"""Safe loading: safetensors only unless allowed, remote code only per config, and the hub token
reaches `from_pretrained` but never the store, the logs, the Prefect artifacts or the output."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fasttrack.core.config import RunConfig
from fasttrack.core.errors import ModelError
from fasttrack.lib.models import load_pretrained
from flows.cli import app
from tests.conftest import tiny_config_dict, write_config
from tests.e2e.bad_inputs import remote_code

pytestmark = [pytest.mark.e2e]
ENV_TOKEN = "hf_FAKEenvTOKEN7c1d0e5b9a"
BLOCK_TOKEN = "hf_FAKEblockTOKEN3f8e2a6c4d"


def _cfg(tmp_path: Path, **model) -> RunConfig:
    return RunConfig.model_validate(tiny_config_dict(tmp_path / "store", model=model))


def test_pickle_checkpoint_refused_unless_allowed(tmp_path: Path, tiny_model_dir: Path) -> None:
    from safetensors.torch import load_file

    path = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, path)
    weights = load_file(path / "model.safetensors")
    torch.save(weights, path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="only pickle weights .*model.allow_pickle: true"):
        load_pretrained(_cfg(tmp_path), str(path), None)
    model, _ = load_pretrained(_cfg(tmp_path, allow_pickle=True), str(path), None)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[name], w) for name, w in weights.items() if name in loaded)


def test_remote_code_runs_only_when_the_config_says_so(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    marker = tmp_path / "remote-code-ran"
    path = tmp_path / "custom-model"
    shutil.copytree(tiny_model_dir, path)
    remote_code(
        path,
        "from pathlib import Path\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom_tiny'\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n",
    )
    assert RunConfig.model_fields["model"].default.trust_remote_code is False
    with pytest.raises(ModelError, match="set model.trust_remote_code: true if you trust it"):
        load_pretrained(_cfg(tmp_path), str(path), None)
    assert not marker.exists()
    model, _ = load_pretrained(_cfg(tmp_path, trust_remote_code=True), str(path), None)
    assert marker.exists() and type(model).__name__ == "CustomModel"


def _spy_token(monkeypatch: pytest.MonkeyPatch) -> list:
    """Record the `token=` of every from_pretrained call (weights, tokenizers, configs)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    seen: list = []
    for cls in (AutoModelForCausalLM, AutoTokenizer, AutoConfig):
        original = cls.from_pretrained

        def spy(*args, _original=original, **kwargs):
            seen.append((kwargs.get("token"), kwargs.get("use_safetensors", "-")))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    return seen


def _everything_prefect_kept(expect: str) -> str:
    """Logs, artifacts and flow-run parameters as the Prefect API serves them, once the logs
    (shipped in the background) include `expect`."""
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # drains the background log worker
    with get_client(sync_client=True) as client:
        for _ in range(50):
            logs = [log.message for log in client.read_logs()]
            if any(expect in m for m in logs):
                break
            time.sleep(0.2)
        artifacts = [a.model_dump_json() for a in client.read_artifacts()]
        runs = [r.model_dump_json() for r in client.read_flow_runs()]
    assert any(expect in m for m in logs), "the run's logs never reached the API"
    return "\n".join([*logs, *artifacts, *runs])


def _store_bytes(store: Path) -> bytes:
    return b"".join(p.read_bytes() for p in store.rglob("*") if p.is_file())


@pytest.mark.usefixtures("prefect_harness")
def test_hub_token_is_used_but_never_stored_or_logged(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from prefect.blocks.system import Secret

    seen = _spy_token(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    d = tiny_config_dict(tmp_path / "store")
    d["pretrain"] |= {"max_steps": 4, "eval_steps": 2, "save_steps": 2, "logging_steps": 1}
    d["compute"] = {"isolate": False}  # the spy patches this process (a child is checked below)
    cfg = write_config(tmp_path / "run.yaml", d)
    result = CliRunner().invoke(app, ["run", str(cfg), "--stages", "data,pretrain"])
    assert result.exit_code == 0, result.output
    assert seen and {token for token, _ in seen} == {ENV_TOKEN}  # every call got the token
    assert {safe for _, safe in seen} <= {True, "-"}  # weights: safetensors only

    # The same from a Prefect Secret block named by the config (HF_TOKEN unset).
    Secret(value=BLOCK_TOKEN).save("fasttrack-test-hf-token", overwrite=True)
    monkeypatch.delenv("HF_TOKEN")
    seen.clear()
    d["hf_token_secret"] = "fasttrack-test-hf-token"
    write_config(cfg, d)
    result2 = CliRunner().invoke(
        app, ["run", str(cfg), "--stages", "pretrain", "--force", "pretrain"]
    )
    assert result2.exit_code == 0, result2.output
    assert seen and {token for token, _ in seen} == {BLOCK_TOKEN}
    # A training child loads the block through the parent's Prefect API, and logs no token.
    isolated = ["--set", "compute.isolate=true", "--set", "pretrain.max_steps=5"]
    result3 = CliRunner().invoke(app, ["run", str(cfg), "--stages", "pretrain", *isolated])
    assert result3.exit_code == 0, result3.output

    captured = capfd.readouterr()
    texts = {
        "cli output": result.output + result2.output + result3.output,
        "captured stdout/stderr": captured.out + captured.err,
        "python logs": caplog.text,
        "prefect logs, artifacts, flow runs": _everything_prefect_kept("pretrain: published"),
    }
    for token in (ENV_TOKEN, BLOCK_TOKEN):
        assert token.encode() not in _store_bytes(tmp_path / "store"), "token in the store"
        for where, text in texts.items():
            assert token not in text, f"token in {where}"


def test_hub_dataset_gets_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    from fasttrack.core.config import SourceConfig
    from fasttrack.lib.sources import load_source

    calls = []
    monkeypatch.setattr(
        datasets, "load_dataset", lambda *a, **kw: calls.append(kw) or [{"text": "a doc"}]
    )
    src = SourceConfig(path="hf://owner/private-ds:train", format="text")
    assert load_source(src, token=ENV_TOKEN)[1] == [{"text": "a doc", "title": ""}]
    assert calls[0]["token"] == ENV_TOKEN and calls[0]["split"] == "train"
