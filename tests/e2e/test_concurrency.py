"""Two `fasttrack run`s of one config started together, sharing one PREFECT_HOME (as a user's
two terminals do): both start Prefect's ephemeral API on the same SQLite DB (its startup is
serialised by the CLI, see `flows.cli_common.start_ephemeral_api`), every key is built once,
the other run waits on the key's lock and reuses it, and both finish with the same keys."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from fasttrack.core.config_loader import load_config
from fasttrack.core.store import ArtifactStore
from tests.e2e.storecheck import ROOT, assert_consistent, cli_env, fault_config, spawn

pytestmark = pytest.mark.e2e
ROW = re.compile(r"│ (\S+)\s+│ ([0-9a-f]{12}) │ (executed|cached)\s+│")


def test_two_runs_at_once_build_each_key_once(tmp_path: Path) -> None:
    cfg_path = fault_config(tmp_path)
    store = ArtifactStore(load_config(cfg_path).store)
    env = cli_env(tmp_path / "prefect-home")  # shared, and no PREFECT_API_URL: ephemeral API
    args = ["run", str(cfg_path)]
    logs = [tmp_path / "run-a.log", tmp_path / "run-b.log"]
    procs = [spawn(args, env, log) for log in logs]
    codes = [p.wait(timeout=550) for p in procs]
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n\n".join(t[-3000:] for t in texts)
    for text in texts:
        assert "Starting temporary server" in text  # each used its own ephemeral API...
        assert "Traceback" not in text and "OperationalError" not in text  # ...on one DB
    built = Counter(m for t in texts for m in re.findall(r"- (\w+): building ([0-9a-f]{12})", t))
    published = {(m["stage"], m["key"][:12]) for m in store.manifests()}
    assert set(built) == published and set(built.values()) == {1}  # each key built once
    steps = [{step: key for step, key, _ in ROW.findall(t)} for t in texts]
    assert steps[0] == steps[1] and len(steps[0]) == 14  # the same final keys in both runs
    statuses = Counter(status for t in texts for *_, status in ROW.findall(t))
    assert statuses["executed"] == len(published)  # the rest was reused from the other run
    assert_consistent(store)
    assert list((store.scratch / "tmp").iterdir()) == []


_START = """
import sys, time
from flows.cli_common import start_ephemeral_api
from prefect import flow
while time.time() < float(sys.argv[1]):  # both processes start their server in the same ms
    time.sleep(0.001)
{start}
print("flow result", flow(lambda: 42, name="probe")())
"""


def _start_together(tmp_path: Path, start: str) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of two processes starting the ephemeral API at one instant."""
    env = cli_env(tmp_path / "prefect-home")
    cmd = [sys.executable, "-c", _START.format(start=start), str(time.time() + 8)]
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
        for _ in range(2)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=300) for p in procs]
    return [(p.returncode, *out) for p, out in zip(procs, outputs, strict=True)]


def test_simultaneous_ephemeral_api_starts_on_one_home(tmp_path: Path) -> None:
    """Without the lock, two servers migrating one fresh SQLite DB in the same instant fail
    (a server traceback, "duplicate column name ...": 3 of 6 trials here); with it, 0 of 3."""
    for code, out, errs in _start_together(tmp_path, "start_ephemeral_api()"):
        assert code == 0 and "flow result 42" in out, errs[-3000:]
        assert "Traceback" not in errs and "OperationalError" not in errs
