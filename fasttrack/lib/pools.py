"""Where a stage's embarrassingly parallel work runs: in-process, local processes or Dask workers.

Shared by the data stage (cleaning batches) and the RAG stage (embedding shards) so both read
`engine`/`workers`/`compute.dask_address` the same way. Every pool is a
`concurrent.futures.Executor` (Dask's via `Client.get_executor`), so callers submit plain
functions and never depend on which engine runs them.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any

from fasttrack.core.config import RunConfig


@contextmanager
def dask_client(cfg: RunConfig, workers: int) -> Iterator[Any]:
    """The scheduler at compute.dask_address, or a LocalCluster of `workers` processes."""
    from distributed import Client, LocalCluster

    if cfg.compute.dask_address:
        with Client(cfg.compute.dask_address) as client:
            yield client
        return
    kw = {"n_workers": workers, "threads_per_worker": 1, "dashboard_address": None}
    with LocalCluster(processes=True, **kw) as cluster, Client(cluster) as client:
        yield client


@contextmanager
def worker_pool(cfg: RunConfig, engine: str, workers: int) -> Iterator[tuple[Executor | None, int]]:
    """(executor, workers it runs): None and 1 for in-process work (local, one worker)."""
    if engine == "dask":
        with dask_client(cfg, workers) as client:
            yield client.get_executor(pure=False), sum(client.nthreads().values())
    elif workers > 1:
        # forkserver: the stage may run in a thread of a Prefect process (fork + threads hangs)
        ctx = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            yield pool, workers
    else:
        yield None, 1
