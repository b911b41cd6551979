"""The `fasttrack` CLI: bad input gives exit 2 and one line naming the culprit; ls lists."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fasttrack.core.store import ArtifactStore
from flows.cli import app
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
    """Found inside the flow's tasks: checked in a real process, as a user sees them (every
    bad-data case is also checked in-process by tests/e2e/test_bad_inputs.py)."""

    def cfg(name: str, source: Path, fmt: str) -> str:
        d = tiny_config_dict(
            tmp_path / "store", data={"sources": [{"path": str(source), "format": fmt}]}
        )
        return str(write_config(tmp_path / name, d))

    bad_jsonl = _bad(tmp_path, "bad.jsonl", '{"text": "ok ok ok ok ok"}\n{"text": oops}\n')
    return [(["run", cfg("b.yaml", bad_jsonl, "text")], f"{bad_jsonl}:2: invalid JSON")]


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
        # the one line only: Prefect's "Finished in state Failed(... DataError: ...)" lines
        # and the task/flow exception records used to repeat it
        assert (proc.stdout + proc.stderr).count(expected) == 1, proc.stdout + proc.stderr
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


def test_plan_has_a_device_verdict_and_full_columns_when_piped(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path / "store"))
    result = runner.invoke(app, ["plan", str(cfg)], env={"COLUMNS": ""})
    assert result.exit_code == 0, result.output
    assert "device: CUDA" in result.stdout or "device: CPU, system RAM" in result.stdout
    assert "…" not in result.stdout  # rich cut every column to 80 characters in all
    assert "tokens/param" in result.stdout and "Chinchilla" in result.stdout
    assert result.stdout.count("fits (") == 3, result.stdout  # pretrain, sft, dpo


def test_run_prints_report_path_and_flags_small_samples(tmp_path: Path) -> None:
    """`run` says where the report is; metrics on < 30 rows are flagged in table and report."""
    cfg = write_config(tmp_path / "c.yaml", tiny_config_dict(tmp_path / "store"))
    args = ["run", str(cfg), "--stages", "data,evaluate", "--set", "rag.enabled=false",
            "--set", "evaluate.generation_rows=0"]  # fmt: skip
    result = runner.invoke(app, args, env={"COLUMNS": ""})
    assert result.exit_code == 0, result.output
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("report: "))
    report = Path(line.removeprefix("report: "))
    assert report.name == "report.md" and report.is_file()
    assert "sft_loss n=" in result.stdout and "pref_accuracy n=" in result.stdout
    text = report.read_text()
    assert "small_n" in text and "fewer than 30 rows" in text
