"""Operations helpers behind `fasttrack deploy | worker | zombies` (self-hosted Prefect).

    fasttrack deploy                 # work pool `fasttrack` (process) + queues cpu, gpu(limit 1),
                                     # then `prefect deploy --all` from prefect.yaml
    fasttrack worker --queue gpu     # a process worker polling one queue of the pool
    fasttrack zombies                # automation: runs whose heartbeats stop are marked Crashed

All of them talk to the server in PREFECT_API_URL; they refuse to run without one, because
deployments, workers and automations on Prefect's throw-away ephemeral API would be lost.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from fasttrack.core.errors import FastTrackError

ROOT = Path(__file__).resolve().parent.parent
POOL = "fasttrack"
QUEUES = {"cpu": None, "gpu": 1}  # queue -> concurrency limit (one GPU job at a time)
HEARTBEAT_S = 30  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY workers should set
ZOMBIE_AFTER_S = 120  # no heartbeat for this long -> Crashed
ZOMBIE_AUTOMATION = "fasttrack: crash zombie flow runs"


class OpsError(FastTrackError):
    """A deploy/worker/automation command that cannot work as asked."""


def require_server() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise OpsError(
            "PREFECT_API_URL is not set: start a server (`prefect server start`) and "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api` first"
        )
    return url


def prefect_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


def ensure_pool() -> list[str]:
    """Create the process work pool and its queues if missing; return what was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    created = []
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
            created.append(f"work pool {POOL}")
        except ObjectAlreadyExists:
            pass
        for queue, limit in QUEUES.items():
            try:
                client.create_work_queue(queue, work_pool_name=POOL, concurrency_limit=limit)
                created.append(f"queue {POOL}/{queue}")
            except ObjectAlreadyExists:
                pass
    return created


def deploy(names: list[str] | None = None) -> int:
    """Pool + queues, then `prefect deploy` of prefect.yaml (all deployments or `names`)."""
    require_server()
    ensure_pool()
    which = [a for n in names for a in ("--name", n)] if names else ["--all"]
    cmd = prefect_cmd("--no-prompt", "deploy", *which, "--prefect-file", "prefect.yaml")
    return subprocess.call(cmd, cwd=ROOT)


def worker_cmd(queue: str, limit: int | None = None) -> list[str]:
    if queue not in QUEUES:
        raise OpsError(f"--queue: unknown queue {queue!r} (queues: {', '.join(QUEUES)})")
    cmd = prefect_cmd("worker", "start", "--pool", POOL, "--work-queue", queue, "--type")
    cmd.append("process")
    return cmd + (["--limit", str(limit)] if limit else [])


def worker(queue: str, limit: int | None = None) -> None:
    """Replace this process with a Prefect process worker on `queue` (heartbeats on)."""
    require_server()
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_S))
    cmd = worker_cmd(queue, limit)
    os.chdir(ROOT)
    os.execv(cmd[0], cmd)


def zombie_automation():
    """Prefect's documented 'detect zombie flows' automation, with our thresholds."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return Automation(
        name=ZOMBIE_AUTOMATION,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=ZOMBIE_AFTER_S),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"No heartbeat for {ZOMBIE_AFTER_S} s: marked Crashed (fasttrack zombies)",
            )
        ],
    )


def create_zombie_automation() -> str:
    """Create (or replace) the automation; returns its id."""
    from prefect.automations import Automation

    require_server()
    with contextlib.suppress(ValueError):  # not there yet
        Automation.read(name=ZOMBIE_AUTOMATION).delete()
    return str(zombie_automation().create().id)
