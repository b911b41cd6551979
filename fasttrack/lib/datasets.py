"""Reading the data stage's artifact: `<kind>/<split>.parquet` (kinds: corpus, sft, preference).

Every stage that consumes data reads it through here, so no stage imports the data stage.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from fasttrack.core.errors import DataError
from fasttrack.core.store import ArtifactRef, ArtifactStore

SPLITS = ("train", "validation", "test")


def has_kind(store: ArtifactStore, ref: ArtifactRef, kind: str) -> bool:
    return (store.local_path(ref) / kind / "train.parquet").exists()


def split_path(store: ArtifactStore, ref: ArtifactRef, kind: str, split: str) -> Path:
    """The parquet file of one split of one kind (for streaming readers, e.g. `datasets`)."""
    path = store.local_path(ref) / kind / f"{split}.parquet"
    if not path.exists():
        kinds = sorted(p.name for p in store.local_path(ref).iterdir() if p.is_dir())
        raise DataError(
            f"data: no {kind} dataset in the data artifact (have: {', '.join(kinds) or 'none'}); "
            f"add a source whose format produces {kind} rows"
        )
    return path


def read_split(store: ArtifactStore, ref: ArtifactRef, kind: str, split: str) -> list[dict]:
    """Rows of one split of one kind from a data artifact, in memory."""
    return pq.read_table(split_path(store, ref, kind, split)).to_pylist()
