"""Incremental re-index vs a full rebuild, after changing 1 % of the documents.

    python benchmarks/rag_incremental.py [--backend onnx-int8] [--changed 0.01] [--max-docs N]

The demo documents (stdlib_docs + pydoc_topics, `--copies` times with numbered titles) are
written to a folder and indexed by the real rag stage (`build_index`, default chunking, Flat
index). Then `--changed` of the documents get a sentence appended and the index is built again
in the same store (incremental: it reuses the vectors of unchanged passages of the previous
artifact) and in a fresh store (a full rebuild; the ONNX export is copied in first, so neither
build pays for it). Reported: the embedding time (`embed_s` in the manifest: reuse lookup +
model) and the whole stage's wall time of each, their ratios, and how the incremental artifact
compares with the full rebuild (same key; chunks equal; vectors within float tolerance).
Writes benchmarks/results/rag_incremental.json; the machine's load average is recorded (the
machine may be shared: say so when reading the figures).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_docs(folder: Path, copies: int, limit: int) -> list[Path]:
    from fasttrack.lib.demo import DEMO_DIR

    folder.mkdir(parents=True)
    files = []
    for c in range(copies):
        for name in ("stdlib_docs", "pydoc_topics"):
            with open(DEMO_DIR / f"{name}.jsonl", encoding="utf-8") as f:
                for i, line in enumerate(f):
                    r = json.loads(line)
                    path = folder / f"{name}-{c}-{i:04d}.md"
                    path.write_text(f"# {r['title']} ({c})\n\n{r['text']}", encoding="utf-8")
                    files.append(path)
    return files[: limit or None]


def config(store: Path, docs: Path, backend: str, tmp: Path):
    import yaml

    from fasttrack.core.config_loader import load_config

    rag = {"documents": str(docs), "index": "flat", "embedder_backend": backend}
    path = tmp / f"{store.name}.yaml"
    data = {"sources": [{"path": "demo:pydoc_topics", "format": "text"}]}  # unused: documents
    cfg = {"name": "bench-incremental", "store": str(store), "data": data, "rag": rag}
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path)


def timed_build(cfg) -> tuple[object, float, dict]:
    from fasttrack.core.store import ArtifactStore
    from tasks.rag import build_index

    t0 = time.perf_counter()
    ref = build_index(cfg)
    wall = time.perf_counter() - t0
    return ref, wall, ArtifactStore(cfg.store).read_manifest("rag", ref.key)


def main() -> None:
    import pyarrow.parquet as pq

    from fasttrack.lib.embed_backend import EXPORT_STAGE

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="onnx-int8", choices=["torch", "onnx", "onnx-int8"])
    ap.add_argument("--changed", type=float, default=0.01)
    ap.add_argument("--copies", type=int, default=1)
    ap.add_argument("--max-docs", type=int, default=0, help="0: all")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/rag_incremental.json")
    args = ap.parse_args()
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="rag-incr-"))
    try:
        files = write_docs(tmp / "docs", args.copies, args.max_docs)
        inc_store, full_store = tmp / "inc", tmp / "full"
        cfg = config(inc_store, tmp / "docs", args.backend, tmp)
        first, first_wall, m1 = timed_build(cfg)
        n_changed = max(1, round(len(files) * args.changed))
        rng = np.random.default_rng(0)
        for i in sorted(rng.choice(len(files), n_changed, replace=False)):
            with open(files[i], "a", encoding="utf-8") as f:
                f.write("\n\nThis paragraph was added to measure incremental re-indexing.\n")
        inc, inc_wall, m2 = timed_build(cfg)
        if (inc_store / EXPORT_STAGE).is_dir():  # the export is not what is measured
            shutil.copytree(inc_store / EXPORT_STAGE, full_store / EXPORT_STAGE)
        full, full_wall, m3 = timed_build(config(full_store, tmp / "docs", args.backend, tmp))
        a, b = Path(inc.uri), Path(full.uri)
        va, vb = np.load(a / "embeddings.npy"), np.load(b / "embeddings.npy")
        cos = (va * vb).sum(1)
        result = {
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
                "loadavg_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
                "note": "shared machine: other jobs ran on the same cores during the measurement",
            },
            "goal": {"embed_speedup": 50},
            "backend": args.backend,
            "documents": len(files),
            "changed_documents": n_changed,
            "chunks": full.metrics["chunks"],
            "first_build": {"wall_s": round(first_wall, 2), "embed_s": m1["embed_s"]},
            "incremental": {
                "wall_s": round(inc_wall, 2),
                "embed_s": m2["embed_s"],
                "embedded_chunks": inc.metrics["embedded_chunks"],
                "reused_chunks": inc.metrics["reused_chunks"],
            },
            "full_rebuild": {
                "wall_s": round(full_wall, 2),
                "embed_s": m3["embed_s"],
                "embedded_chunks": full.metrics["embedded_chunks"],
            },
            "embed_speedup": round(m3["embed_s"] / m2["embed_s"], 1),
            "stage_speedup": round(full_wall / inc_wall, 2),
            "same_as_full_rebuild": {
                "key": inc.key == full.key,
                "chunks_parquet_equal": pq.read_table(a / "chunks.parquet").equals(
                    pq.read_table(b / "chunks.parquet")
                ),
                "vectors_max_abs_diff": float(np.abs(va - vb).max()),
                "vectors_min_cosine": round(float(cos.min()), 6),
                "vectors_identical_rows": int((va == vb).all(1).sum()),
            },
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
