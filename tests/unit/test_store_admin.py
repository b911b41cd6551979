"""`fasttrack verify` and `fasttrack gc`: what is referenced stays, old garbage goes, exit codes."""

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fasttrack.core.errors import FastTrackError
from fasttrack.core.store import ArtifactStore, compute_key
from fasttrack.core.store_admin import gc, parse_age, referenced, verify_all
from flows.cli import app

runner = CliRunner()
DAY = 86400.0


def _art(store: ArtifactStore, stage: str, name: str, age_days: float = 0, **fields) -> str:
    """Publish a one-file artifact, then backdate its manifest by `age_days`."""
    key = compute_key(stage, "1", {"name": name})
    with store.staging(stage, key) as out:
        (out / "f.txt").write_text(name)
        store.publish(stage, key, out, config={"name": name}, **fields)
    path = Path(store.uri(stage, key)) / "manifest.json"
    manifest = json.loads(path.read_text())
    when = datetime.now(UTC) - timedelta(days=age_days)
    manifest["created_at"] = when.isoformat(timespec="seconds")
    path.write_text(json.dumps(manifest))
    return key


def _store(tmp_path: Path) -> tuple[ArtifactStore, dict[str, str]]:
    s = ArtifactStore(tmp_path / "s")
    k = {"data": _art(s, "data", "d", 30)}
    k["old_model"] = _art(s, "pretrain", "m0", 30, upstream={"data": k["data"]})
    k["model"] = _art(s, "pretrain", "m1", 20, upstream={"data": k["data"]})
    k["old_report"] = _art(s, "report", "r0", 25, run="x", upstream={"m": k["old_model"]})
    k["report"] = _art(s, "report", "r1", 20, run="x", upstream={"m": k["model"]})
    k["promoted_src"] = _art(s, "data", "p-data", 40)
    k["promoted"] = _art(s, "sft", "p", 40, upstream={"d": k["promoted_src"]})
    k["orphan"] = _art(s, "sft", "o", 10)
    k["young_up"] = _art(s, "data", "y-data", 30)
    k["young"] = _art(s, "sft", "y", 0, upstream={"d": k["young_up"]})
    (tmp_path / "s" / "promoted.json").write_text(
        json.dumps({"x": {"promoted": k["promoted"], "stage": "sft"}})
    )
    return s, k


def test_parse_age() -> None:
    assert parse_age("7d") == 7 * DAY and parse_age("12h") == 12 * 3600 and parse_age("90s") == 90
    with pytest.raises(FastTrackError, match="expected a number"):
        parse_age("7 days")


def test_referenced_is_the_closure_of_promoted_newest_reports_and_recent(tmp_path: Path) -> None:
    store, k = _store(tmp_path)
    keep = referenced(store, store.manifests(), 7 * DAY, time.time())
    assert set(keep) == {k[n] for n in ("data", "model", "report", "promoted_src", "promoted",
                                        "young", "young_up")}  # fmt: skip
    assert keep[k["young_up"]].startswith("upstream of sft")
    assert keep[k["report"]] == "newest report of x"


def test_gc_removes_only_old_unreferenced(tmp_path: Path) -> None:
    store, k = _store(tmp_path)
    (tmp_path / "s" / "work" / "sft" / k["orphan"]).mkdir(parents=True)
    dry = gc(store, 7 * DAY, dry_run=True)
    assert {key for _, key, _ in dry.removed} == {k["old_model"], k["old_report"], k["orphan"]}
    assert len(store.manifests()) == 10 and dry.work_dirs == []  # dry run: nothing touched
    # A key being built (its lock held) is skipped, not removed under the builder's feet.
    with store.lock("sft", k["orphan"]):
        result = gc(store, 7 * DAY)
    assert result.busy == [f"sft/{k['orphan']}"] and result.kept == 7
    assert {key for _, key, _ in result.removed} == {k["old_model"], k["old_report"]}
    assert {m["key"] for m in store.manifests()} == set(k.values()) - {
        k["old_model"],
        k["old_report"],
    }
    assert store.lookup("sft", k["orphan"]) is not None
    assert all(store.verify(m["stage"], m["key"]) == [] for m in store.manifests())
    assert list((tmp_path / "s" / "tmp").iterdir()) == []


def test_cli_gc_and_verify(tmp_path: Path) -> None:
    store, k = _store(tmp_path)
    s = str(tmp_path / "s")
    result = runner.invoke(app, ["gc", "--older-than", "7d", "--dry-run", "--store", s])
    assert result.exit_code == 0 and "would remove 3 artifact(s)" in result.stdout
    assert len(store.manifests()) == 10
    result = runner.invoke(app, ["gc", "--older-than", "soon", "--store", s])
    assert result.exit_code == 2 and "--older-than 'soon'" in result.stderr
    result = runner.invoke(app, ["verify", "--store", s])
    assert result.exit_code == 0 and "verified 10 artifact(s)" in result.stdout
    bad = Path(store.uri("sft", k["orphan"])) / "f.txt"
    bad.write_text("O")  # same size, other byte
    result = runner.invoke(app, ["verify", "--store", s, "--no-quarantine"])
    assert result.exit_code == 1 and "f.txt: sha256 mismatch" in result.stderr
    assert store.lookup("sft", k["orphan"]) is not None  # only reported
    result = runner.invoke(app, ["verify", "--store", s])
    assert result.exit_code == 1 and "quarantined to" in result.stderr
    assert store.lookup("sft", k["orphan"]) is None
    assert len(list((tmp_path / "s" / "quarantine" / "sft").iterdir())) == 2  # dir + note
    result = runner.invoke(app, ["verify", "--store", s])
    assert result.exit_code == 0 and "verified 9 artifact(s) in" in result.stdout


def test_verify_all_reports_every_problem(tmp_path: Path) -> None:
    store, k = _store(tmp_path)
    (Path(store.uri("data", k["data"])) / "f.txt").unlink()
    checked, findings = verify_all(store, fix=False)
    assert checked == 10 and [(f.key, f.problems) for f in findings] == [
        (k["data"], ["f.txt: missing"])
    ]
