"""Every bad input of tests/e2e/bad_inputs.py: exit 2, one `error:` line naming the culprit,
no traceback, nothing published by the failing step. The CLI runs in-process (one Prefect
harness for all cases), and docs/errors.md must be the table rendered from the same cases."""

from __future__ import annotations

import shutil
from pathlib import Path

# Prefect binds its log handlers to the streams of the process's first `import prefect.main`: do
# it here, not inside a CliRunner invocation whose stderr is closed afterwards (`run` now
# imports Prefect only after the preflight checks).
import prefect.main  # noqa: E402, F401, I001
import pytest
from typer.testing import CliRunner

from fasttrack.core.store import ArtifactStore
from flows.cli import app
from tests.e2e.bad_inputs import CASES, Case, Ctx, render_doc

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_harness")]
ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(scope="module")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One store for the model cases: their data step is built once, then reused."""
    return tmp_path_factory.mktemp("model-store") / "store"


def _vllm_ready() -> bool:
    import importlib.util

    import torch

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(
    case: Case,
    tmp_path: Path,
    tiny_model_dir: Path,
    model_store: Path,
    capfd: pytest.CaptureFixture,
) -> None:
    if case.id == "cli-serve-vllm-without-cuda" and _vllm_ready():
        pytest.skip("vllm and a CUDA device are both here: tests/e2e/test_serve_vllm.py serves")
    store = model_store if case.group == "model" else tmp_path / "store"
    args, culprit = case.make(Ctx(tmp=tmp_path, store=store, model=tiny_model_dir))
    result = runner.invoke(app, args)
    logged = capfd.readouterr()  # what Prefect's log handlers wrote to the real stdout/stderr
    assert result.exit_code == 2, (args, result.output, result.exception)
    # (Prefect's INFO log lines may share stderr, depending on when its handlers were set up)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, (args, result.stderr)
    message = errors[0].removeprefix("error: ")
    assert case.pattern(culprit).fullmatch(message), (case.shape, culprit, message)
    for text in (result.output, logged.out, logged.err):
        assert "Traceback" not in text, text
    published = {m["stage"] for m in ArtifactStore(store).manifests()} if store.exists() else set()
    if case.stage is None:
        assert not published
    else:
        assert case.stage not in published, published
        assert published <= ({"data"} if case.stage == "base" else set())


def test_table_size_and_docs_are_current() -> None:
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)
    assert {c.group for c in CASES} == {"config", "cli", "store", "data", "model"}
    doc = ROOT / "docs" / "errors.md"
    assert doc.read_text() == render_doc(), (
        "docs/errors.md is stale: python -m tests.e2e.bad_inputs > docs/errors.md"
    )


def test_large_record_limit_is_configurable(tmp_path: Path) -> None:
    """The 10 MB line is rejected by default and loads with `data.max_record_chars: null`."""
    from fasttrack.core.config import SourceConfig
    from fasttrack.lib.sources import load_source
    from tests.e2e.bad_inputs import BIG_LINE

    path = tmp_path / "big.jsonl"
    path.write_text(BIG_LINE)
    _, rows = load_source(SourceConfig(path=str(path), format="text"), max_chars=None)
    assert len(rows[0]["text"]) == len("word ") * 2_000_000
    shutil.rmtree(tmp_path)
