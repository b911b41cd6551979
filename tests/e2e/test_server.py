"""A real Prefect server + process worker: deploy prefect.yaml, run the tiny pipeline through
the worker as the scheduler would, read task runs/cache states/artifacts back through the
client, look at the run's page in headless Chromium, and cancel a run mid-training."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from fasttrack.core.compute import free_port
from fasttrack.core.config_loader import load_config
from fasttrack.core.store import ArtifactStore
from tests.conftest import tiny_config_dict, training_children, write_config

pytestmark = [pytest.mark.e2e, pytest.mark.server]
ROOT = Path(__file__).resolve().parents[2]
SHOTS = Path(os.environ.get("FASTTRACK_TEST_ARTIFACTS", ROOT / "test-artifacts"))
DEPLOYMENT = "fasttrack-pipeline/weekly-full"


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A background service in its own process group (stopped by signalling the group)."""
    out = log.open("w")
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=15)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, what: str) -> None:
    """Poll `url` until it answers 200 (the service's log on an early exit; stopped and failed
    after 180 s)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop(proc)
    pytest.fail(f"{what} did not become healthy in 180 s")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[dict[str, str]]:
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": url,
        "PREFECT_UI_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
    }
    proc = start(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
         str(port)], env, home / "server.log",
    )  # fmt: skip
    wait_healthy(proc, f"{url}/health", home / "server.log", "the Prefect server")
    yield {**env, "home": str(home), "ui": url.removesuffix("/api")}
    stop(proc)


@pytest.fixture(scope="module")
def worker(server) -> Iterator[subprocess.Popen]:
    env = {k: v for k, v in server.items() if k not in ("home", "ui")}
    deployed = subprocess.run(
        [sys.executable, "-m", "flows.cli", "deploy"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    proc = start(
        [sys.executable, "-m", "flows.cli", "worker", "--queue", "cpu"], env,
        Path(server["home"]) / "worker.log",
    )  # fmt: skip
    yield proc
    stop(proc)  # workers before the server, else they hang


@pytest.fixture
def client_settings(server):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server["PREFECT_API_URL"]}):
        yield


def tiny(tmp_path: Path, **pretrain) -> Path:
    d = tiny_config_dict(
        tmp_path / "store", sft={"enabled": False}, dpo={"enabled": False},
        rag={"enabled": False},
    )  # fmt: skip
    d["pretrain"] |= pretrain
    return write_config(tmp_path / "tiny.yaml", d)


def trigger(cfg_path: Path, timeout: float):
    from prefect.deployments import run_deployment

    params = {"config": str(cfg_path), "stages": ["data", "pretrain", "evaluate"]}
    return run_deployment(DEPLOYMENT, parameters={"params": params}, timeout=timeout)


def task_states(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flt = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=flt)
    return {r.name: r.state.name for r in runs}  # e.g. pretrain-bb4: Cached


@pytest.fixture(scope="module")
def finished_runs(server, worker, tmp_path_factory):
    """Two runs of the tiny pipeline through the worker: the second reuses everything."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    cfg_path = tiny(tmp_path_factory.mktemp("deployed"))
    with temporary_settings(updates={PREFECT_API_URL: server["PREFECT_API_URL"]}):
        first = trigger(cfg_path, timeout=900)
        second = trigger(cfg_path, timeout=600)
    return first, second


def test_deployment_runs_through_the_worker(finished_runs, client_settings):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    first, second = finished_runs
    assert first.state.is_completed(), first.state.message
    assert first.deployment_id is not None and first.work_queue_name == "cpu"
    states = task_states(first.id)
    stages = {name.rsplit("-", 1)[0] for name in states}
    assert {"data", "base", "pack", "pretrain", "evaluate", "report"} <= stages
    assert set(states.values()) == {"Completed"}

    assert second.state.is_completed(), second.state.message
    again = task_states(second.id)
    assert again and set(again.values()) == {"Cached"}  # nothing recomputed on the worker

    flt = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[first.id]))
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts(artifact_filter=flt)}
    assert {"fasttrack-metrics", "fasttrack-report", "fasttrack-artifact-pretrain"} <= keys


@pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium")
def test_run_page_in_headless_chromium(finished_runs, server, tmp_path):
    first, _ = finished_runs
    url = f"{server['ui']}/v2/runs/flow-run/{first.id}?tab=Artifacts"
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--window-size=1400,1400", "--virtual-time-budget=15000",
    ]  # fmt: skip
    SHOTS.mkdir(parents=True, exist_ok=True)
    shot = SHOTS / "ui-flow-run.png"
    dom = subprocess.run(
        ["chromium", *flags, f"--user-data-dir={tmp_path / 'a'}", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    subprocess.run(
        ["chromium", *flags, f"--user-data-dir={tmp_path / 'b'}", f"--screenshot={shot}", url],
        capture_output=True, timeout=120,
    )  # fmt: skip
    assert first.name in dom and "fasttrack-pipeline" in dom
    assert "fasttrack-metrics" in dom  # the metrics table artifact of this run
    assert shot.is_file() and shot.stat().st_size > 20_000  # a rendered page, not a blank one


def test_cancel_stops_the_training_child(server, worker, tmp_path, client_settings):
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    cfg_path = tiny(tmp_path, max_steps=100_000, save_steps=50)
    run = trigger(cfg_path, timeout=0)
    deadline, child = time.monotonic() + 300, None
    while child is None and time.monotonic() < deadline:
        for proc in training_children(psutil.Process(worker.pid)):
            child = proc
        time.sleep(0.5)
    assert child is not None, "the training child never started"
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run.id, Cancelling(message="cancelled by the test"))
        asked = time.monotonic()
        gone, _ = psutil.wait_procs([child], timeout=30)
        assert gone, "the training child outlived the cancellation by 30 s"
        seconds = time.monotonic() - asked
        while time.monotonic() < asked + 60:
            state = client.read_flow_run(run.id).state
            if state.is_final():
                break
            time.sleep(1)
    assert state.is_cancelled(), state
    store = ArtifactStore(load_config(cfg_path).store)
    assert not [m for m in store.manifests() if m["stage"] == "pretrain"]
    print(f"training child gone {seconds:.1f} s after the cancel request")
