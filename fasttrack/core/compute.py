"""Where and how training runs: the `compute:` section of a run config.

Kept apart from fasttrack/core/config.py because it grows with the launchers and none of it changes
what a stage computes (up to floating-point reduction order), so none of it is part of any
artifact key: a model trained on 1 process is reused by a run that asks for 2.

- `isolate`: train in a killable child process (fasttrack/core/isolation.py).
- `task_runner`: model evaluations run on the flow's threads or on Dask workers (a
  LocalCluster, or any scheduler address).
- `num_processes > 1`: the child is started by `accelerate launch` (torchrun underneath), one
  rank per process; `strategy` ddp (every rank holds the model, gradients all-reduced) or fsdp
  (FSDP2 full shard, auto-wrapped per decoder layer, the full state dict gathered on save so the
  artifact is a plain safetensors model/adapter). On CPU the ranks use the gloo backend, for
  both strategies (fasttrack/core/fsdp.py); mixed precision is the stage's own `precision`.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Below this many CPUs the RAG build and a training child oversubscribe the cores (each runs
# one thread per core): on 2 cores, pretrain and RAG side by side took 358 s of wall time where
# one after the other they take ~175-250 s (issue #15, measured on a quiet machine).
PARALLEL_MIN_CPUS = 4


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class ComputeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    isolate: bool = Field(
        True,
        description="Train in a child process, so cancel/timeout/Ctrl-C really stop it "
        "(false: train in the flow process, for debugging).",
    )
    num_processes: int = Field(1, ge=1, description="Training ranks (accelerate launch if > 1).")
    strategy: Literal["ddp", "fsdp"] = "ddp"
    main_process_port: int | None = Field(
        None, ge=1024, le=65535, description="Rendezvous port (default: a free one)."
    )
    task_runner: Literal["thread", "dask"] = Field(
        "thread", description="Where model evaluations run: flow threads, or Dask workers."
    )
    eval_workers: int = Field(
        1, ge=1, description="Evaluations at once (threads, or LocalCluster worker processes)."
    )
    dask_address: str | None = Field(
        None, description="Dask scheduler (tcp://host:8786); default: a LocalCluster."
    )
    rag_concurrency: Literal["auto", "parallel", "serial"] = Field(
        "auto",
        description="Build the RAG index alongside training (parallel) or after it (serial); "
        f"auto: parallel only with at least {PARALLEL_MIN_CPUS} CPUs, where both get cores.",
    )

    @model_validator(mode="after")
    def _launcher_needs_isolation(self) -> ComputeConfig:
        if self.num_processes > 1 and not self.isolate:
            raise ValueError("num_processes > 1 needs isolate: true (ranks are child processes)")
        return self


def rag_in_parallel(compute: ComputeConfig) -> bool:
    """Whether the RAG build runs concurrently with the training chain."""
    if compute.rag_concurrency == "auto":
        return cpu_count() >= PARALLEL_MIN_CPUS
    return compute.rag_concurrency == "parallel"


def eval_runner(compute: ComputeConfig) -> Any:
    """The Prefect task runner evaluations fan out on (a context manager: it starts/stops it).

    Dask: a `LocalCluster` of `eval_workers` single-threaded processes (torch in each, no GIL
    contention), or the scheduler at `dask_address`; workers need this project installed.
    """
    if compute.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if compute.dask_address:
            return DaskTaskRunner(address=compute.dask_address)
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": compute.eval_workers,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": None,
            }
        )
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=compute.eval_workers)


def threads_per_worker(compute: ComputeConfig) -> int | None:
    """Torch threads each evaluation thread gets when several share this process: the CPUs
    split between them (None: one evaluation at a time, or Dask processes, keep the default)."""
    if compute.task_runner != "thread" or compute.eval_workers <= 1:
        return None
    return max(1, cpu_count() // compute.eval_workers)


@contextmanager
def eval_threads(compute: ComputeConfig) -> Iterator[None]:
    """Partition torch's intra-op threads between concurrent evaluation threads, so that
    `eval_workers` evaluations side by side use the cores once instead of each spawning one
    OpenMP thread per core (oversubscribed). The setting is process-wide, so it is restored
    afterwards."""
    budget = threads_per_worker(compute)
    if budget is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(budget)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_prefix(compute: ComputeConfig, mixed_precision: str) -> list[str]:
    """The `accelerate launch ... -m` prefix for the training child ([] for one process)."""
    if compute.num_processes <= 1:
        return []
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", str(compute.num_processes), "--num_machines", "1",
        "--mixed_precision", mixed_precision, "--dynamo_backend", "no",
        "--main_process_port", str(compute.main_process_port or free_port()),
    ]  # fmt: skip
    if compute.strategy == "fsdp":
        cmd += [
            "--use_fsdp",
            "--fsdp_version",
            "2",
            "--fsdp_auto_wrap_policy",
            "TRANSFORMER_BASED_WRAP",
            "--fsdp_state_dict_type",
            "FULL_STATE_DICT",
            "--fsdp_reshard_after_forward",
            "true",
        ]  # fmt: skip  (wrapped classes: the model's `_no_split_modules`, its decoder layer)
    else:
        cmd.append("--multi_gpu")  # torchrun; the ranks pick gloo themselves on CPU
    return [*cmd, "-m"]
