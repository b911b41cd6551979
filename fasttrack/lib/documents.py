"""The documents a RAG index (and RAFT's training contexts) are built from: the files under
`rag.documents`, else every split of the data artifact's corpus. One loader, so retrieval at
training time (tasks/sft.py, lib/raft.py) sees the documents the RAG stage indexes."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fasttrack.core.config import RunConfig
from fasttrack.core.errors import DataError
from fasttrack.core.files import input_digest
from fasttrack.core.log import get_logger
from fasttrack.core.store import ArtifactRef, ArtifactStore
from fasttrack.lib.datasets import SPLITS, read_split
from fasttrack.lib.retrieval import Document

DOC_SUFFIXES = (".txt", ".md")


def document_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"rag.documents: {folder}: folder not found")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in DOC_SUFFIXES)


def documents_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for f in document_files(folder):
        h.update(f"{f.relative_to(folder).as_posix()}\0{input_digest(f)}\n".encode())
    return h.hexdigest()


def load_documents(
    cfg: RunConfig, store: ArtifactStore, data: ArtifactRef | None
) -> tuple[list[Document], list[str]]:
    """(documents, skipped files): the `rag.documents` folder, else every corpus split."""
    rag, docs, skipped = cfg.rag, [], []
    if rag.documents:
        folder = Path(rag.documents).expanduser()
        where = str(folder)
        for f in document_files(folder):
            rel = f.relative_to(folder).as_posix()
            try:
                text = f.read_bytes().decode("utf-8")  # bytes as-is: offsets match the file
            except UnicodeDecodeError as exc:
                msg = f"rag.documents: {f}: not valid UTF-8 (byte {exc.start}: {exc.reason})"
                if rag.on_decode_error == "error":
                    raise DataError(
                        f"{msg}; re-encode it or set rag.on_decode_error: skip"
                    ) from None
                get_logger().warning("%s; skipped", msg)
                skipped.append(rel)
                continue
            docs.append(Document(rel, f.stem, text))
    else:
        assert data is not None
        where = f"the corpus of data artifact {data.short}"
        for split in SPLITS:
            try:
                rows = read_split(store, data, "corpus", split)
            except DataError:
                raise DataError(
                    "rag: the corpus is empty: the data artifact has no corpus (add a source "
                    "with format: text, or set rag.documents)"
                ) from None
            docs += [
                Document(str(r.get("id") or f"{split}/{i}"), r.get("title") or "", r["text"])
                for i, r in enumerate(rows)
            ]
    if not any(d.text.strip() for d in docs):
        raise DataError(f"rag: the corpus is empty: no document with text in {where}")
    return docs, skipped
