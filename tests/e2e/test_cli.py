"""The `fasttrack` CLI: bad input gives exit 2 and one line naming the culprit; ls lists."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks.config import load_config
from tasks.store import ArtifactStore
from tasks.training import checkpoint_complete
from tests.conftest import tiny_config_dict, write_config

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_harness")]
runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


def _bad(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _config_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    """Rejected before Prefect starts: checked in-process."""
    good = write_config(tmp_path / "good.yaml", tiny_config_dict(tmp_path / "store"))
    unknown = "data: {sources: [{path: x, format: text}]}\nwat: 1\n"
    return [
        (["run", str(tmp_path / "absent.yaml")], "absent.yaml: config file not found"),
        (
            ["run", str(_bad(tmp_path, "syntax.yaml", "data: [\n"))],
            "syntax.yaml:2:1: YAML syntax error",
        ),
        (["run", str(_bad(tmp_path, "unknown.yaml", unknown))], "unknown.yaml:2: wat: unknown key"),
        (
            ["run", str(good), "--set", "pretrain.learning_rate=-1"],
            "pretrain.learning_rate: Input should be greater than 0",
        ),
        (["run", str(good), "--stages", "data,bogus"], "--stages: unknown stage 'bogus'"),
        (["run", str(good), "--force", "nothing"], "--force: unknown step 'nothing'"),
    ]


def _data_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    """Found inside the flow's tasks: checked in real processes, as a user sees them."""

    def cfg(name: str, source: Path, fmt: str) -> str:
        d = tiny_config_dict(
            tmp_path / "store", data={"sources": [{"path": str(source), "format": fmt}]}
        )
        return str(write_config(tmp_path / name, d))

    bad_jsonl = _bad(tmp_path, "bad.jsonl", '{"text": "ok ok ok ok ok"}\n{"text": oops}\n')
    no_col = _bad(tmp_path, "nocol.jsonl", '{"question": "q"}\n')
    return [
        (
            ["run", cfg("m.yaml", tmp_path / "nope.jsonl", "text")],
            "nope.jsonl: source file not found",
        ),
        (["run", cfg("b.yaml", bad_jsonl, "text")], f"{bad_jsonl}:2: invalid JSON"),
        (["run", cfg("c.yaml", no_col, "alpaca")], f"{no_col}:1: missing column 'instruction'"),
    ]


def _check(code: int, stderr: str, output: str, expected: str, args: list[str]) -> None:
    assert code == 2, (args, output)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], (args, stderr)
    assert "Traceback" not in output, (args, output)


def test_bad_config_and_arguments(tmp_path: Path) -> None:
    for args, expected in _config_cases(tmp_path):
        result = runner.invoke(app, args)
        _check(result.exit_code, result.stderr, result.output, expected, args)
    assert not (tmp_path / "store").exists()


def test_bad_data_fails_the_run_with_one_line_and_no_artifact(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"COLUMNS": "300"}
    for args, expected in _data_cases(tmp_path):  # sequential: one SQLite DB, one writer
        proc = subprocess.run(
            [sys.executable, "-m", "flows.cli", *args], cwd=ROOT, text=True, capture_output=True,
            env=env | {"PREFECT_HOME": str(tmp_path / "ph")}, timeout=300,
        )  # fmt: skip
        _check(proc.returncode, proc.stderr, proc.stdout + proc.stderr, expected, args)
    assert ArtifactStore(tmp_path / "store").manifests() == []


def test_run_and_ls(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path / "store"))
    result = runner.invoke(app, ["run", str(cfg), "--stages", "data"])
    assert result.exit_code == 0, result.output
    assert "1 step(s) executed" in result.stdout
    result = runner.invoke(app, ["ls", "--store", str(tmp_path / "store")])
    assert (
        result.exit_code == 0 and "data" in result.stdout and "corpus.train_rows" in result.stdout
    )


def test_sigkill_during_pretraining_then_resume(tmp_path: Path) -> None:
    """Kill the whole run mid-training: no half artifact; the re-run resumes from a checkpoint."""
    d = tiny_config_dict(tmp_path / "store")
    d["model"]["architecture"] |= {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
    }
    d["pretrain"] |= {
        "max_steps": 80,
        "save_steps": 10,
        "eval_steps": 40,
        "per_device_batch_size": 16,
        "block_size": 128,
    }
    d["evaluate"]["perplexity"]["max_length"] = 128
    cfg_path = write_config(tmp_path / "resume.yaml", d)
    cfg = load_config(cfg_path)
    store = ArtifactStore(cfg.store)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)  # the child runs on its own ephemeral API
    cmd = [sys.executable, "-m", "flows.cli", "run", str(cfg_path), "--stages", "pretrain"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    work = store.scratch / "work" / "pretrain"
    deadline = time.time() + 240

    def complete() -> list[Path]:
        return [p for p in work.glob("*/checkpoint-*") if checkpoint_complete(p)]

    try:
        while time.time() < deadline and not complete():
            assert proc.poll() is None, "training finished or died before a checkpoint was seen"
            time.sleep(0.05)
        assert complete(), "no complete checkpoint within the time limit"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert [m["stage"] for m in store.manifests() if m["stage"] == "pretrain"] == []

    from flows.pipeline import PipelineParams, pipeline

    summary = pipeline(PipelineParams(config=str(cfg_path), stages=["pretrain"]))
    pre = next(s for s in summary.steps if s.step == "pretrain")
    assert pre.status == "executed"
    assert pre.metrics["resumed_from_step"] >= 10 and pre.metrics["steps"] == 80
    assert [m["stage"] for m in store.manifests()].count("pretrain") == 1
    assert not list(work.glob("*/checkpoint-*"))  # work dir cleaned after publish
    assert list((store.scratch / "tmp").iterdir()) == []  # the killed run's staging litter is gone
