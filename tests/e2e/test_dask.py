"""Dask: evaluations fan out on a LocalCluster (three models evaluated at the same time, read
back through the Prefect API), and the data stage runs its per-row work on one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import tiny_config_dict, write_config

pytestmark = pytest.mark.e2e


def test_three_evaluations_run_in_parallel_on_dask(tmp_path, prefect_harness):
    pytest.importorskip("prefect_dask")
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.pipeline import PipelineParams, pipeline

    d = tiny_config_dict(
        tmp_path / "store", dpo={"enabled": False}, rag={"enabled": False},
        compute={"task_runner": "dask", "eval_workers": 3},
    )  # fmt: skip
    cfg = write_config(tmp_path / "dask.yaml", d)
    stages = ["data", "pretrain", "sft", "evaluate"]
    state = pipeline(PipelineParams(config=str(cfg), stages=stages), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert {"evaluate:base", "evaluate:pretrain", "evaluate:sft"} <= {s.step for s in summary.steps}

    flt = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        runs = [
            r for r in client.read_task_runs(flow_run_filter=flt) if r.name.startswith("evaluate")
        ]
    assert len(runs) == 3 and all(r.state.is_completed() for r in runs)
    latest_start = max(r.start_time for r in runs)
    earliest_end = min(r.end_time for r in runs)
    assert latest_start < earliest_end, "the three evaluations did not overlap in time"


def test_data_stage_on_a_dask_cluster_equals_the_local_run(tmp_path, monkeypatch):
    """The data stage's per-row work on a 2-worker LocalCluster, batches of 7 rows (JSONL:
    500-byte blocks of lines, parsed on the workers): the same key and byte-identical rows,
    drops and splits as the in-process run."""
    pytest.importorskip("distributed")
    from fasttrack.core.config_loader import load_config
    from fasttrack.lib import dataprep, jsonl_blocks
    from tasks.data import prepare_data
    from tests.unit.test_data_stage import _digests

    local = load_config(write_config(tmp_path / "a.yaml", tiny_config_dict(tmp_path / "s1")))
    d = tiny_config_dict(tmp_path / "s2")
    d["data"].update(engine="dask", workers=2)
    on_dask = load_config(write_config(tmp_path / "b.yaml", d))
    ref_local = prepare_data(local)
    monkeypatch.setattr(dataprep, "BATCH_ROWS", 7)
    monkeypatch.setattr(jsonl_blocks, "BLOCK_BYTES", 500)
    ref_dask = prepare_data(on_dask)
    assert ref_dask.key == ref_local.key
    assert _digests(ref_dask.uri) == _digests(ref_local.uri)
    manifest = json.loads((Path(ref_dask.uri) / "manifest.json").read_text())
    assert (manifest["engine"], manifest["workers"]) == ("dask", 2)


def test_rag_embedding_on_a_dask_cluster_equals_the_local_run(tmp_path):
    """RAG shards of 4 chunks embedded by a 2-worker LocalCluster: the same key and chunks as
    the in-process build, vectors equal to float rounding, the schedule in the manifest."""
    pytest.importorskip("distributed")
    import numpy as np
    import pyarrow.parquet as pq

    from tasks.rag import build_index
    from tests.unit.test_rag import DOCS, _cfg, _write_docs

    docs = str(_write_docs(tmp_path / "docs", DOCS))
    kw = {"documents": docs, "chunk": {"size_tokens": 32, "overlap_tokens": 8}, "index": "flat"}
    local = build_index(_cfg(tmp_path, "s1", **kw))
    on_dask = build_index(_cfg(tmp_path, "s2", engine="dask", workers=2, shard_size=4, **kw))
    assert on_dask.key == local.key and not on_dask.reused
    a, b = Path(local.uri), Path(on_dask.uri)
    assert pq.read_table(a / "chunks.parquet").equals(pq.read_table(b / "chunks.parquet"))
    va, vb = np.load(a / "embeddings.npy"), np.load(b / "embeddings.npy")
    assert va.shape == vb.shape and ((va * vb).sum(1)).min() > 0.999  # unit rows: cosine
    manifest = json.loads((b / "manifest.json").read_text())
    assert manifest["embedding"] == {"engine": "dask", "workers": 2, "shard_size": 4}
