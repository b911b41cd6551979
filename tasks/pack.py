"""Pack step of pretraining: tokenize the corpus with the base tokenizer and pack fixed blocks.

Documents are tokenized with `datasets.map(batched=True)`, each started by BOS when the tokenizer
adds one itself (Gemma, Llama, Mistral) and followed by EOS, concatenated and
cut into `block_size` blocks. Nothing is dropped: the final partial block is padded and its
padding masked (attention_mask 0, label -100), so every document token is trained on. The key
includes the base artifact (tokenizer, template, pad/EOS) so a changed tokenizer can never reuse
stale blocks.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fasttrack.core.config import RunConfig
from fasttrack.core.errors import ModelError
from fasttrack.core.stage import BuildResult, Stage, StageSpec
from fasttrack.core.store import ArtifactRef, ArtifactStore

STAGE = Stage("pack", "1")
SPLITS = ("train", "validation")


def pack_spec(cfg: RunConfig, data: ArtifactRef, base: ArtifactRef) -> StageSpec:
    config = {"block_size": cfg.pretrain.block_size, "splits": list(SPLITS)}
    return STAGE.spec(config, upstream={"data": data, "base": base})


def pack_blocks(
    docs: Iterable[list[int]], block_size: int, eos_id: int, pad_id: int
) -> Iterator[tuple[list[int], list[int]]]:
    """(input_ids, attention_mask) blocks of EOS-separated documents; the tail block is padded."""
    buf: list[int] = []
    for ids in docs:
        buf.extend(ids)
        buf.append(eos_id)
        while len(buf) >= block_size:
            yield buf[:block_size], [1] * block_size
            del buf[:block_size]
    if buf:
        n = len(buf)
        yield buf + [pad_id] * (block_size - n), [1] * n + [0] * (block_size - n)


def tokenize_texts(
    texts: list[str] | Path, tokenizer, cache_dir: Path, num_proc: int | None = None
) -> Iterator[list[int]]:
    """Token ids per document, via datasets.map(batched=True) (multi-process capable), each
    starting with BOS where the tokenizer starts texts with one (tasks/templates.py).
    `texts` may be a parquet file with a `text` column: it is then memory-mapped as Arrow,
    never a Python list, and the ids are streamed in batches."""
    import datasets

    from fasttrack.core.templates import document_bos

    head = [] if (bos := document_bos(tokenizer)) is None else [bos]
    if isinstance(texts, Path) and pq.ParquetFile(texts).metadata.num_rows:
        ds = datasets.Dataset.from_parquet(
            str(texts), columns=["text"], cache_dir=str(cache_dir / "hf-cache")
        )
    else:
        ds = datasets.Dataset.from_dict({"text": [] if isinstance(texts, Path) else texts})

    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [head + doc for doc in ids]}

    tokenized = ds.map(
        encode,
        batched=True,
        remove_columns=["text"],
        cache_file_name=str(cache_dir / "tokenized.arrow"),
        desc="tokenize",
        num_proc=num_proc if num_proc and num_proc > 1 else None,
    )
    for batch in tokenized.iter(batch_size=1000):
        yield from batch["ids"]


def write_blocks(blocks: Iterator[tuple[list[int], list[int]]], path: Path) -> int:
    schema = pa.schema(
        [("input_ids", pa.list_(pa.int32())), ("attention_mask", pa.list_(pa.int8()))]
    )
    n = 0
    with pq.ParquetWriter(path, schema) as writer:
        chunk: list[tuple[list[int], list[int]]] = []
        for block in blocks:
            chunk.append(block)
            if len(chunk) == 1024:
                n += _flush(writer, schema, chunk)
        n += _flush(writer, schema, chunk)
    return n


def _flush(writer: pq.ParquetWriter, schema: pa.Schema, chunk: list) -> int:
    if not chunk:
        return 0
    ids, mask = zip(*chunk, strict=True)
    writer.write_table(
        pa.table({"input_ids": list(ids), "attention_mask": list(mask)}, schema=schema)
    )
    n = len(chunk)
    chunk.clear()
    return n


def pack_workers(path: Path) -> int:
    """Tokenizer processes: one per core (at most 8) above 16 MB of text; none for less (a pool
    costs more than it saves). The blocks do not depend on it (map keeps the order)."""
    return 1 if path.stat().st_size < 16_000_000 else max(1, min(os.cpu_count() or 1, 8))


def build_pack(cfg: RunConfig, spec: StageSpec, out: Path) -> BuildResult:
    from fasttrack.lib.datasets import split_path
    from fasttrack.lib.models import load_tokenizer, max_positions

    store, data, base = ArtifactStore(cfg.store), spec.upstream["data"], spec.upstream["base"]
    tok, model_config = load_tokenizer(cfg, base)
    limit, block = max_positions(model_config), cfg.pretrain.block_size
    if limit is not None and block > limit:
        raise ModelError(
            f"pretrain.block_size ({block}) is larger than the model's max_position_embeddings "
            f"({limit})"
        )
    if tok.eos_token_id is None:
        raise ModelError("the base tokenizer has no EOS token; set one to separate documents")
    metrics = {}
    for split in SPLITS:
        path = split_path(store, data, "corpus", split)
        docs = tokenize_texts(path, tok, out, num_proc=pack_workers(path))
        tokens = 0

        def counted(docs=docs) -> Iterator[list[int]]:
            nonlocal tokens
            for ids in docs:
                tokens += len(ids) + 1
                yield ids

        n = write_blocks(
            pack_blocks(counted(), block, tok.eos_token_id, tok.pad_token_id),
            out / f"{split}.parquet",
        )
        metrics[f"{split}_blocks"], metrics[f"{split}_tokens"] = n, tokens
        metrics[f"{split}_docs"] = pq.ParquetFile(path).metadata.num_rows
        (out / "tokenized.arrow").unlink(missing_ok=True)
    for f in out.glob("*.arrow"):  # map's per-process pieces (tokenized_0000X_of_...)
        f.unlink()
    shutil.rmtree(out / "hf-cache", ignore_errors=True)
    return BuildResult(metrics=metrics)


pack, pack_task = STAGE.define(pack_spec, build_pack)
