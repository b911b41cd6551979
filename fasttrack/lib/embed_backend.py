"""Embedder backends: the sentence-transformers model as stock torch fp32, or its transformer
exported to ONNX (fp32, or int8 by dynamic quantization) and run by ONNX Runtime.

Why: on CPU the embedding of chunks is most of the RAG stage; ONNX Runtime with int8 weights
embeds much faster than torch fp32 at the same retrieval quality (benchmarks/rag.py).
Why not sentence-transformers' own `backend="onnx"`: it needs `optimum-onnx`, whose only release
pins transformers < 4.58. So the transformer is exported with torch's own exporter and quantized
with onnxruntime's, and the ONNX session replaces only the transformer *inside* the
sentence-transformers model: tokenization, length-sorted batching, pooling and normalization
stay sentence-transformers' own code, so the backends differ in the matrix math alone.
The export takes seconds, so it is done once per (embedder content, backend) and kept in the
artifact store as a content-addressed entry (`embedder-onnx/<key>`, key = source fingerprint +
backend + export code version): a changed embedder can never run a stale export, and build,
ask and serve processes sharing a store run the same bytes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from fasttrack.core.errors import ModelError
from fasttrack.core.log import get_logger
from fasttrack.core.store import ArtifactStore, compute_key

Backend = Literal["torch", "onnx", "onnx-int8"]
BACKENDS: tuple[str, ...] = ("torch", "onnx", "onnx-int8")
EXPORT_STAGE = "embedder-onnx"
EXPORT_VERSION = "1"  # bump when the export or quantization recipe changes
OPSET = 17


def onnx_file(backend: str) -> str:
    return "model.onnx" if backend == "onnx" else "model_int8.onnx"


def export_key(fingerprint: str, backend: str) -> str:
    config = {"backend": backend, "file": onnx_file(backend), "opset": OPSET}
    return compute_key(EXPORT_STAGE, EXPORT_VERSION, config, inputs={"embedder": fingerprint})


def _export(st: Any, out: Path, backend: str) -> None:
    """Write the ONNX file of `st`'s transformer (inputs as its tokenizer makes them)."""
    import torch

    hf = st[0].model
    hf.config._attn_implementation = "eager"  # traceable; sdpa and eager compute the same
    sample = st.tokenizer(["a short text", "a somewhat longer text to embed"], padding=True,
                          return_tensors="pt")  # fmt: skip
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in sample]

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hf = hf

        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            return self.hf(**dict(zip(names, args, strict=True))).last_hidden_state

    axes = {n: {0: "batch", 1: "sequence"} for n in [*names, "last_hidden_state"]}
    fp32 = out / "model.onnx"
    with torch.no_grad():
        torch.onnx.export(
            Hidden().eval(), tuple(sample[n] for n in names), str(fp32), dynamo=False,
            input_names=names, output_names=["last_hidden_state"], dynamic_axes=axes,
            opset_version=OPSET,
        )  # fmt: skip
    if backend == "onnx-int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            fp32, out / onnx_file(backend), weight_type=QuantType.QInt8, per_channel=True,
            reduce_range=True, op_types_to_quantize=["MatMul"], nodes_to_quantize=_int8_nodes(fp32),
        )  # fmt: skip
        fp32.unlink()


def _int8_nodes(path: Path) -> list[str]:
    """The MatMuls worth int8: activation x weight, except down-projections (more input than
    output features: the FFN's second layer). Their inputs (after GELU) and the attention
    products (activation x activation) have outliers that one dynamic per-tensor scale loses:
    quantizing them too dropped the min cosine to torch fp32 from 0.995 to 0.985 on MiniLM."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dims = {t.name: list(t.dims) for t in graph.initializer}
    return [
        n.name
        for n in graph.node
        if n.op_type == "MatMul" and len(w := dims.get(n.input[1], [])) == 2 and w[0] <= w[1]
    ]


def exported_model(store: ArtifactStore, st: Any, fingerprint: str, backend: str) -> Path:
    """The local ONNX file of `st` for `backend`, exported on first use (under the store's
    lock, so concurrent builds export once)."""
    key = export_key(fingerprint, backend)
    if (ref := store.lookup(EXPORT_STAGE, key)) is None:
        with store.lock(EXPORT_STAGE, key):
            if (ref := store.lookup(EXPORT_STAGE, key)) is None:
                get_logger().info("rag: exporting the embedder to %s (once per store)", backend)
                with store.staging(EXPORT_STAGE, key) as tmp:
                    try:
                        _export(st, tmp, backend)
                    except (ImportError, OSError, RuntimeError, ValueError) as exc:
                        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                        raise ModelError(
                            f"rag.embedder_backend: cannot export the embedder to {backend}: "
                            f"{first or type(exc).__name__}; set rag.embedder_backend: torch"
                        ) from None
                    ref = store.publish(
                        EXPORT_STAGE, key, tmp,
                        config={"backend": backend, "file": onnx_file(backend), "opset": OPSET},
                        inputs={"embedder": fingerprint},
                    )  # fmt: skip
    return store.local_path(ref) / onnx_file(backend)


def _session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # one chain of ops: no inter-op pool
    cores = (
        os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    )
    opts.intra_op_num_threads = len(cores)  # the cores this process may use (taskset, cgroup)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _ort_module(session: Any, config: Any, per_row: bool) -> Any:
    """A torch module standing in for the transformer: same inputs, same `last_hidden_state`.
    A text's vector must not depend on its batch-mates (an index must be reproducible, and an
    incremental re-index equal to a full rebuild): fp32 runs batched, padded to the longest
    text of the batch, and is bit-identical to the text run alone (masked keys get exactly 0
    attention weight; every other op computes a row from that row alone; pinned by
    tests/unit/test_rag_backend.py). `per_row` (int8): each text runs alone, without its
    padding: dynamic quantization scales activations by the min/max of the whole input tensor,
    batch-mates included (cosine 0.996 between two batchings of a text)."""
    import numpy as np
    import torch

    class OrtTransformer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.session, self.config = session, config
            self.device = torch.device("cpu")
            self.inputs = [i.name for i in session.get_inputs()]

        def forward(self, **features: Any) -> dict[str, torch.Tensor]:
            ids = features["input_ids"]
            feeds = {
                n: (features[n] if features.get(n) is not None else torch.zeros_like(ids))
                .cpu().numpy().astype("int64")
                for n in self.inputs
            }  # fmt: skip
            if not per_row:
                (hidden,) = self.session.run(["last_hidden_state"], feeds)
                return {"last_hidden_state": torch.from_numpy(hidden)}
            mask = feeds.get("attention_mask", np.ones_like(feeds["input_ids"]))
            hidden = np.zeros((*mask.shape, self.config.hidden_size), dtype=np.float32)
            for i, row in enumerate(mask):
                keep = np.flatnonzero(row)
                alone = {n: v[i : i + 1, keep] for n, v in feeds.items()}
                hidden[i, keep] = self.session.run(["last_hidden_state"], alone)[0][0]
            return {"last_hidden_state": torch.from_numpy(hidden)}

    return OrtTransformer()


def on_backend(st: Any, backend: str, store: ArtifactStore, fingerprint: str) -> Any:
    """`st` (a CPU SentenceTransformer) with its transformer run by ONNX Runtime."""
    if backend == "torch":
        return st
    path = exported_model(store, st, fingerprint, backend)
    try:
        session = _session(path)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelError(f"rag.embedder_backend: cannot load {path}: {exc}") from None
    st[0].model = _ort_module(session, st[0].model.config, per_row=backend == "onnx-int8")
    return st
