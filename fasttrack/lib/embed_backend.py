"""Embedder backends: the sentence-transformers model as stock torch fp32, or its transformer
exported to ONNX (fp32, or int8 by dynamic quantization) and run by ONNX Runtime, or that ONNX
export converted to OpenVINO IR and run by OpenVINO's CPU plugin (fp32, or bf16 arithmetic).

Why: on CPU the embedding of chunks is most of the RAG stage; ONNX Runtime with int8 weights
embeds much faster than torch fp32 at the same retrieval quality (benchmarks/rag.py).
Why not sentence-transformers' own `backend="onnx"`: it needs `optimum-onnx`, whose only release
pins transformers < 4.58. So the transformer is exported with torch's own exporter and quantized
with onnxruntime's, and the ONNX session replaces only the transformer *inside* the
sentence-transformers model: tokenization, length-sorted batching, pooling and normalization
stay sentence-transformers' own code, so the backends differ in the matrix math alone.
OpenVINO (issue #15 goal 4): on the same fp32 weights its CPU kernels embed the demo chunks at
2.2-2.8x torch fp32 per CPU-second with recall@10 vs exact fp32 1.0 (ONNX Runtime fp32:
1.4-1.8x); with bf16 arithmetic (AVX512-BF16/AMX CPUs; elsewhere OpenVINO computes fp32)
3.2-4.2x at top-10 overlap 0.994 and the same document recall (two loaded runs:
benchmarks/results/rag_embed_loaded*.json).
The export takes seconds, so it is done once per (embedder content, backend) and kept in the
artifact store as a content-addressed entry (`embedder-onnx/<key>`, key = source fingerprint +
backend + export code version): a changed embedder can never run a stale export, and build,
ask and serve processes sharing a store run the same bytes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fasttrack.core.errors import ModelError
from fasttrack.core.log import get_logger
from fasttrack.core.store import ArtifactStore, compute_key

Backend = Literal["torch", "onnx", "onnx-int8", "openvino", "openvino-bf16"]
BACKENDS: tuple[str, ...] = ("torch", "onnx", "onnx-int8", "openvino", "openvino-bf16")
EXPORT_STAGE = "embedder-onnx"
EXPORT_VERSION = "1"  # bump when the export or quantization recipe changes
OPSET = 17
# OpenVINO's CPU plugin computes in this precision; fp32 and bf16 run the same IR (one export)
OV_PRECISION = {"openvino": "f32", "openvino-bf16": "bf16"}


def export_of(backend: str) -> str:
    """The export a backend runs: both OpenVINO backends share one fp32 IR."""
    return "openvino" if backend in OV_PRECISION else backend


def onnx_file(backend: str) -> str:
    """The model file of `backend`'s export (OpenVINO: the IR's .xml; its .bin sits beside)."""
    files = {"onnx": "model.onnx", "onnx-int8": "model_int8.onnx", "openvino": "model.xml"}
    return files[export_of(backend)]


def _export_config(backend: str) -> dict[str, Any]:
    export = export_of(backend)
    config: dict[str, Any] = {"backend": export, "file": onnx_file(export), "opset": OPSET}
    if export == "openvino":  # the IR is the converter's output: a new converter, a new entry
        try:
            import openvino
        except ImportError:
            raise ModelError(
                f"rag.embedder_backend: {backend} needs the `openvino` package (a dependency of "
                "this project: reinstall it), or set rag.embedder_backend: onnx"
            ) from None
        config["openvino"] = openvino.get_version().split("-")[0]
    return config


def export_key(fingerprint: str, backend: str) -> str:
    config = _export_config(backend)
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
    elif backend == "openvino":
        import openvino as ov

        # Core.read_model (the runtime's ONNX reader), not ov.convert_model: the converter sends
        # usage telemetry unless opted out. fp32 weights as exported (save_model's default
        # would halve them to fp16).
        model = ov.Core().read_model(str(fp32))
        ov.save_model(model, out / onnx_file(backend), compress_to_fp16=False)
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
    backend = export_of(backend)
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
                        config=_export_config(backend),
                        inputs={"embedder": fingerprint},
                    )  # fmt: skip
    return store.local_path(ref) / onnx_file(backend)


def _cores() -> int:
    """The cores this process may use (taskset, cgroup), not the machine's."""
    cores = (
        os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    )
    return len(cores)


# Runs the transformer on a list of inputs (name -> int64 array), one output per input.
Run = Callable[[list[dict[str, np.ndarray]]], list[np.ndarray]]


def _ort_runner(path: Path) -> tuple[Run, list[str]]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # one chain of ops: no inter-op pool
    opts.intra_op_num_threads = _cores()
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return (lambda feeds: [session.run(["last_hidden_state"], f)[0] for f in feeds]), names


def _ov_runner(path: Path, precision: str) -> tuple[Run, list[str]]:
    """OpenVINO CPU plugin, throughput mode: one stream per allowed core, one thread each, and
    the texts of a batch spread over the streams (each text alone: see _runner_module). One
    thread per text costs fewer CPU-seconds than two threads splitting each small matmul
    (fp32, demo chunks, one loaded run: 2.8x torch per CPU-s against 2.0x), and a text's arithmetic
    does not depend on the machine's core count. The precision hint is explicit: on
    AVX512-BF16/AMX CPUs OpenVINO's default is bf16, so "openvino" (fp32) must ask for f32;
    on other CPUs a bf16 hint runs fp32."""
    import openvino as ov

    streams = _cores()
    config = {
        "INFERENCE_PRECISION_HINT": precision,
        "PERFORMANCE_HINT": "THROUGHPUT",
        "NUM_STREAMS": streams,
        "INFERENCE_NUM_THREADS": streams,
        # no pinning: the stage shares its cores (training in parallel, serve, other jobs) and
        # pinned threads cannot move off a busy core; per CPU-s it made no measurable difference
        "ENABLE_CPU_PINNING": False,
    }
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    queue = ov.AsyncInferQueue(compiled, streams)
    names = [i.get_any_name() for i in compiled.inputs]
    lock = threading.Lock()  # one queue: a second caller (serve's threads) waits its turn

    def run(feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
        out: list[np.ndarray] = [np.empty(0, np.float32)] * len(feeds)

        def done(request: Any, i: int) -> None:  # copy: the request's buffer is reused
            out[i] = request.get_output_tensor(0).data.copy()

        with lock:
            queue.set_callback(done)
            for i, f in enumerate(feeds):
                queue.start_async({n: np.ascontiguousarray(v) for n, v in f.items()}, i)
            queue.wait_all()
        return out

    return run, names


def _runner_module(run: Run, names: list[str], config: Any, per_row: bool) -> Any:
    """A torch module standing in for the transformer: same inputs, same `last_hidden_state`.
    A text's vector must not depend on its batch-mates (an index must be reproducible, and an
    incremental re-index equal to a full rebuild): ONNX Runtime fp32 runs batched, padded to the
    longest text of the batch, and is bit-identical to the text run alone (masked keys get
    exactly 0 attention weight; every other op computes a row from that row alone; pinned by
    tests/unit/test_rag_backend.py). `per_row`: each text runs alone, without its padding:
    int8 dynamic quantization scales activations by the min/max of the whole input tensor,
    batch-mates included (cosine 0.996 between two batchings of a text), and OpenVINO picks its
    matmul blocking by the input's shape (fp32: 1.6e-7 between two batchings; bf16: 6e-4)."""
    import torch

    class ExportedTransformer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = config
            self.device = torch.device("cpu")

        def forward(self, **features: Any) -> dict[str, torch.Tensor]:
            ids = features["input_ids"]
            feeds = {
                n: (features[n] if features.get(n) is not None else torch.zeros_like(ids))
                .cpu().numpy().astype("int64")
                for n in names
            }  # fmt: skip
            if not per_row:
                return {"last_hidden_state": torch.from_numpy(run([feeds])[0])}
            mask = feeds.get("attention_mask", np.ones_like(feeds["input_ids"]))
            keeps = [np.flatnonzero(row) for row in mask]
            alone = [{n: v[i : i + 1, k] for n, v in feeds.items()} for i, k in enumerate(keeps)]
            hidden = np.zeros((*mask.shape, self.config.hidden_size), dtype=np.float32)
            for i, (keep, out) in enumerate(zip(keeps, run(alone), strict=True)):
                hidden[i, keep] = out[0]
            return {"last_hidden_state": torch.from_numpy(hidden)}

    return ExportedTransformer()


def on_backend(st: Any, backend: str, store: ArtifactStore, fingerprint: str) -> Any:
    """`st` (a CPU SentenceTransformer) with its transformer run by ONNX Runtime or OpenVINO."""
    if backend == "torch":
        return st
    path = exported_model(store, st, fingerprint, backend)
    try:
        if backend in OV_PRECISION:
            run, names = _ov_runner(path, OV_PRECISION[backend])
        else:
            run, names = _ort_runner(path)
    except Exception as exc:  # onnxruntime and openvino raise their own exception types
        raise ModelError(f"rag.embedder_backend: cannot load {path}: {exc}") from None
    per_row = backend != "onnx"  # the one batch-independent backend (see _runner_module)
    st[0].model = _runner_module(run, names, st[0].model.config, per_row)
    return st
