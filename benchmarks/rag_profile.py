"""Where the RAG stage's seconds go: wall and CPU time of each phase of the real build.

    python benchmarks/rag_profile.py [--backend B] [--out benchmarks/results/rag_profile.json]

Builds the data artifact of the default config (tiny-cpu) in a fresh temporary store, then runs
the rag stage's build (`tasks.rag.build_rag`, the code `fasttrack run --stages rag` runs) in
this process with its phases timed by wrapping the functions it calls (no profiler overhead):
imports of the ML libraries, model load, the ONNX export (a fresh store pays it once),
chunking, embedding, FAISS, BM25, the retrieval evaluation. CPU time counts every thread of
the process, so it is the figure to compare on a shared machine; the 1-min load average
before and after is recorded (label: "loaded" when it exceeds the usable cores). Also
reported: tokens embedded and the embedding's CPU-seconds per million tokens, and the FLOPs of
the embedder per token, which bound how fast fp32 can go on these cores.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NOTE = "phases nest: 'load model' includes 'onnx export'; stage_total includes the imports"
PHASES: dict[str, list[float]] = {}  # name -> [wall s, cpu s, calls]


def timed(name: str, fn):
    """`fn`, adding its wall and CPU seconds to PHASES[name] (nested phases count in both)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        w, c = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            acc = PHASES.setdefault(name, [0.0, 0.0, 0])
            acc[0] += time.perf_counter() - w
            acc[1] += time.process_time() - c
            acc[2] += 1

    return wrapper


def flops_per_token(config, seq: float) -> float:
    """Multiply-adds x2 of a BERT encoder layer stack per token: QKV/O and FFN matmuls plus the
    attention products over `seq` positions (embeddings, norms and softmax are negligible)."""
    h, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    return layers * 2 * (4 * h * h + 2 * h * f + 2 * seq * h)


def main() -> None:
    from fasttrack.core.config_eval import RagConfig
    from fasttrack.lib.embed_backend import BACKENDS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default=RagConfig().embedder_backend, choices=BACKENDS)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/rag_profile.json")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    load_before = os.getloadavg()
    t0, c0 = time.perf_counter(), time.process_time()
    from fasttrack.core.config_loader import load_config
    from fasttrack.core.store import ArtifactStore
    from tasks.data import data_spec, prepare_data

    store_dir = tempfile.mkdtemp(prefix="rag-profile-store-")
    cfg = load_config(None, [f"store={store_dir}", f"rag.embedder_backend={args.backend}"])
    prepare_data(cfg)
    data = ArtifactStore(cfg.store).lookup("data", data_spec(cfg).key)
    setup = {
        "wall_s": round(time.perf_counter() - t0, 2),
        "cpu_s": round(time.process_time() - c0, 2),
    }

    import fasttrack.lib.embed_backend as eb
    import fasttrack.lib.embedder as embedder_mod
    import tasks.rag as rag_mod

    # imports are timed inside the first model load: import what the stage imports lazily here
    w, c = time.perf_counter(), time.process_time()
    import faiss  # noqa: F401
    import sentence_transformers  # noqa: F401

    PHASES["import torch+sentence_transformers+faiss"] = [
        time.perf_counter() - w, time.process_time() - c, 1,
    ]  # fmt: skip
    rag_mod.load_documents = timed("load documents", rag_mod.load_documents)
    embedder_mod._load_model = timed("load model (incl. export)", embedder_mod._load_model)
    eb._export = timed("export (fresh store)", eb._export)
    rag_mod.chunk_document = timed("chunking", rag_mod.chunk_document)
    rag_mod.embed_chunks = timed("embed chunks", rag_mod.embed_chunks)
    rag_mod.build_faiss = timed("faiss build", rag_mod.build_faiss)
    rag_mod.build_bm25 = timed("bm25 build", rag_mod.build_bm25)
    rag_mod.write_chunks = timed("write chunks.parquet", rag_mod.write_chunks)
    rag_mod.Retriever = timed("open retriever", rag_mod.Retriever)
    rag_mod.evaluate_retrieval = timed("retrieval evaluation", rag_mod.evaluate_retrieval)

    spec = rag_mod.rag_spec(cfg, data)
    out = Path(tempfile.mkdtemp(prefix="rag-profile-out-"))
    w, c = time.perf_counter(), time.process_time()
    result = rag_mod.build_rag(cfg, spec, out)
    stage = [time.perf_counter() - w, time.process_time() - c]
    stage[0] += PHASES["import torch+sentence_transformers+faiss"][0]
    stage[1] += PHASES["import torch+sentence_transformers+faiss"][1]

    import pyarrow.parquet as pq

    from fasttrack.lib.retrieval import Chunk

    model = next(iter(embedder_mod._MODELS.values()))
    rows = pq.read_table(out / rag_mod.CHUNKS_FILE).to_pylist()
    passages = [Chunk(r["doc_id"], r["title"], "", 0, 0, r["text"], "").passage for r in rows]
    embed_tokens = sum(len(i) for i in model.tokenizer(passages, truncation=True)["input_ids"])
    mean_seq = embed_tokens / max(1, result.metrics["chunks"])
    fpt = flops_per_token(model[0].auto_model.config, mean_seq)
    emb_wall, emb_cpu = PHASES["embed chunks"][:2]
    load_after = os.getloadavg()
    report = {
        "machine": {
            "platform": platform.platform(),
            "cores_usable": cores,
            "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
            "loadavg_1_5_15_after": [round(x, 2) for x in load_after],
            "label": "loaded" if max(load_before[0], load_after[0]) > cores else "quiet",
            "nice": os.nice(0),
        },
        "backend": args.backend,
        "setup_data_stage": setup,
        "stage_total": {"wall_s": round(stage[0], 2), "cpu_s": round(stage[1], 2)},
        "phases": {
            k: {
                "wall_s": round(v[0], 2),
                "cpu_s": round(v[1], 2),
                "calls": v[2],
                "cpu_share": round(v[1] / stage[1], 3),
            }
            for k, v in PHASES.items()
        },  # fmt: skip
        "chunks": result.metrics["chunks"],
        "tokens_embedded": embed_tokens,
        "mean_tokens_per_chunk": round(mean_seq, 1),
        "gflop_per_chunk_pass": round(fpt * embed_tokens / 1e9, 1),
        "embed_gflops_per_cpu_s": round(fpt * embed_tokens / 1e9 / emb_cpu, 1),
        "embed_gflops_per_wall_s": round(fpt * embed_tokens / 1e9 / emb_wall, 1),
        "metrics": {k: v for k, v in result.metrics.items() if "." in k},
        "note": NOTE,
    }
    text = json.dumps(report, indent=2) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"{text}wrote {args.out}")


if __name__ == "__main__":
    main()
