"""Where the RAG build runs relative to training (compute.rag_concurrency)."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from fasttrack.core.compute import PARALLEL_MIN_CPUS, ComputeConfig, cpu_count, rag_in_parallel


@pytest.fixture
def one_cpu():
    """Pin this process to one CPU (as a 1-CPU container cpuset would), then restore."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    yield
    os.sched_setaffinity(0, before)


def test_auto_is_serial_on_few_cpus_and_explicit_modes_win(one_cpu) -> None:
    assert cpu_count() == 1  # the affinity mask, not the host's CPU count
    assert not rag_in_parallel(ComputeConfig())  # 2 stages on 1 core would oversubscribe it
    assert rag_in_parallel(ComputeConfig(rag_concurrency="parallel"))
    assert not rag_in_parallel(ComputeConfig(rag_concurrency="serial"))


def test_auto_follows_the_cpu_count() -> None:
    assert rag_in_parallel(ComputeConfig()) == (cpu_count() >= PARALLEL_MIN_CPUS)


def test_unknown_mode_is_rejected_by_name() -> None:
    with pytest.raises(ValidationError, match="rag_concurrency"):
        ComputeConfig(rag_concurrency="sometimes")


def test_concurrent_evaluations_split_the_cores_and_restore_the_setting() -> None:
    """eval_workers threads share one process: each gets cores / workers torch threads (not
    one OpenMP thread per core each), and the process-wide setting comes back afterwards."""
    import torch

    from fasttrack.core.compute import eval_threads, threads_per_worker

    before = torch.get_num_threads()
    two = ComputeConfig(eval_workers=2)
    with eval_threads(two):
        assert torch.get_num_threads() == max(1, cpu_count() // 2) == threads_per_worker(two)
    assert torch.get_num_threads() == before
    for alone in (ComputeConfig(), ComputeConfig(eval_workers=2, task_runner="dask")):
        with eval_threads(alone):  # one at a time, or separate processes: left as it is
            assert torch.get_num_threads() == before
