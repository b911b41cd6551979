import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fasttrack.core.config_loader import load_config
from fasttrack.core.errors import DataError
from fasttrack.core.store import ArtifactStore
from fasttrack.lib import dataprep, jsonl_blocks
from fasttrack.lib.datasets import read_split
from tasks.data import data_spec, prepare_data
from tests.conftest import tiny_config_dict, write_config


def _rows(store: ArtifactStore, ref, kind: str) -> dict[str, list]:
    return {s: read_split(store, ref, kind, s) for s in ("train", "validation", "test")}


def test_data_stage_outputs_splits_and_stats(tiny_cfg) -> None:
    store = ArtifactStore(tiny_cfg.store)
    ref = prepare_data(tiny_cfg)
    path = Path(ref.uri)
    assert sorted(p.name for p in path.iterdir()) == [
        "corpus",
        "manifest.json",
        "preference",
        "sft",
        "stats.json",
    ]
    stats = json.loads((path / "stats.json").read_text())
    assert stats["corpus"]["loaded"] == 30
    corpus = _rows(store, ref, "corpus")
    total = sum(len(v) for v in corpus.values())
    assert total == stats["corpus"]["kept"] == ref.metrics["corpus.train_rows"] + 6
    assert len(corpus["test"]) == 3 and len(corpus["validation"]) == 3
    texts = [r["text"] for split in corpus.values() for r in split]
    assert len(set(texts)) == len(texts)  # no row in two splits
    sft = read_split(store, ref, "sft", "train")
    assert sft[0]["messages"][-1]["role"] == "assistant"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["stats"] == stats and set(manifest["inputs"]) == {
        "source0",
        "source1",
        "source2",
    }


def test_data_stage_is_deterministic(tmp_path: Path) -> None:
    a = load_config(write_config(tmp_path / "a.yaml", tiny_config_dict(tmp_path / "s1")))
    b = load_config(write_config(tmp_path / "b.yaml", tiny_config_dict(tmp_path / "s2")))
    ra, rb = prepare_data(a), prepare_data(b)
    assert ra.key == rb.key
    for part in ("corpus/train.parquet", "corpus/test.parquet", "sft/validation.parquet"):
        ta = pq.read_table(Path(ra.uri) / part).to_pylist()
        assert ta == pq.read_table(Path(rb.uri) / part).to_pylist()
    other = tiny_config_dict(tmp_path / "s3")
    other["data"]["split"]["seed"] = 2
    rc = prepare_data(load_config(write_config(tmp_path / "c.yaml", other)))
    test_a = [r["text"] for r in pq.read_table(Path(ra.uri) / "corpus/test.parquet").to_pylist()]
    test_c = [r["text"] for r in pq.read_table(Path(rc.uri) / "corpus/test.parquet").to_pylist()]
    assert rc.key != ra.key and test_a != test_c


def test_dedup_and_filters_are_counted(tmp_path: Path) -> None:
    para = " ".join(f"word{i}" for i in range(60))
    rows = [
        {"text": para},
        {"text": para.upper()},  # exact duplicate after casefold
        {"text": para.replace("word59", "changed")},  # near duplicate
        {"text": "short"},
        {"text": "   "},
        {"text": " ".join(f"other{i}" for i in range(40))},
        {"text": " ".join(f"third{i}" for i in range(40))},
        {"text": " ".join(f"fourth{i}" for i in range(40))},
    ]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config_dict(
        tmp_path / "s", data={"sources": [{"path": str(path), "format": "text"}]}
    )
    cfg["data"]["clean"] = {"min_chars": 10}
    ref = prepare_data(load_config(write_config(tmp_path / "c.yaml", cfg)))
    stats = json.loads((Path(ref.uri) / "stats.json").read_text())["corpus"]
    assert stats["dropped_exact_duplicate"] == 1
    assert stats["dropped_near_duplicate"] == 1
    assert stats["dropped_too_short"] == 1 and stats["dropped_empty"] == 1
    assert stats["kept"] == 4


def test_empty_after_cleaning_says_which_filter(tmp_path: Path) -> None:
    path = tmp_path / "tiny.jsonl"
    path.write_text('{"text": "ab"}\n{"text": "cd"}\n{"text": "ab"}\n')
    cfg = tiny_config_dict(
        tmp_path / "s", data={"sources": [{"path": str(path), "format": "text"}]}
    )
    cfg["data"]["clean"] = {"min_chars": 10}
    loaded = load_config(write_config(tmp_path / "c.yaml", cfg))
    with pytest.raises(
        DataError,
        match=r"corpus dataset is empty after cleaning: all 3 rows were removed: too_short 3",
    ):
        prepare_data(loaded)
    assert ArtifactStore(loaded.store).manifests() == []


def test_key_follows_source_content(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "' + "x " * 50 + '"}\n')
    cfg = tiny_config_dict(
        tmp_path / "s", data={"sources": [{"path": str(path), "format": "text"}]}
    )
    loaded = load_config(write_config(tmp_path / "c.yaml", cfg))
    first = data_spec(loaded).key
    path.write_text('{"text": "' + "y " * 50 + '"}\n')
    assert data_spec(loaded).key != first


def test_source_and_id_columns_survive_mixing(tmp_path: Path) -> None:
    """`from_pylist` took columns from the first row: a split starting with a row of the file
    without `source`/`id` lost them for every row. One schema per kind keeps them."""
    plain, tagged = tmp_path / "plain.jsonl", tmp_path / "tagged.jsonl"
    plain.write_text("".join(json.dumps({"text": f"plain doc number {i} " * 3}) + "\n"
                             for i in range(20)))  # fmt: skip
    tagged.write_text("".join(
        json.dumps({"text": f"tagged doc number {i} " * 3, "source": f"s{i}", "id": f"d{i}"})
        + "\n" for i in range(20)
    ))  # fmt: skip
    sources = [{"path": str(plain), "format": "text"}, {"path": str(tagged), "format": "text"}]
    cfg = load_config(write_config(
        tmp_path / "c.yaml",
        tiny_config_dict(tmp_path / "s", data={"sources": sources, "split": {"seed": 3}}),
    ))  # fmt: skip
    ref = prepare_data(cfg)
    store, seen = ArtifactStore(cfg.store), {}
    for split in ("train", "validation", "test"):
        table = pq.read_table(Path(ref.uri) / "corpus" / f"{split}.parquet")
        assert {"text", "title", "source", "id"} <= set(table.column_names), split
        for row in table.to_pylist():
            if row["text"].startswith("tagged"):
                seen[row["id"]] = row["source"]
            else:
                assert row["source"] is None and row["id"] is None
    assert seen == {f"d{i}": f"s{i}" for i in range(20)}
    assert read_split(store, ref, "corpus", "train")


def _digests(uri: str) -> dict[str, str]:
    """sha256 of each split's rows (canonical JSON) and of stats.json."""
    out = {"stats": hashlib.sha256((Path(uri) / "stats.json").read_bytes()).hexdigest()}
    for part in sorted(Path(uri).rglob("*.parquet")):
        rows = json.dumps(pq.read_table(part).to_pylist(), sort_keys=True).encode()
        out[str(part.relative_to(uri))] = hashlib.sha256(rows).hexdigest()
    return out


# The v2 stage's (all in memory, datasketch MinHash) outputs on tiny_cfg's demo sources,
# computed on main before the streaming rewrite: the same rows, drop counts and splits.
# (On the full demo sources of pipeline_configs/tiny-cpu.yaml v3 drops 3 more near duplicates:
# pairs whose true 5-gram Jaccard is 0.82-0.85, at the 0.85 threshold, where any 128-perm
# MinHash estimate is a coin toss; the rest is identical.)
# The v2 stage (4041e04) run on the current demo data; the preference rows were re-derived by
# running that commit's stage on the regenerated demo preference pairs (learnable defects; again
# when three in four became truncated ones).
V2_DIGESTS = {
    "stats": "063576ac48e1b00feffd317150efa66458e3e05c27f4f8ceafa054cf135a48e1",
    "corpus/test.parquet": "c4267df104ba91ffb606ab6060e8dd3fc5d47df477178636e1845f221b917dbb",
    "corpus/train.parquet": "60550bd1e73ebd09043e4ec48aca1db0cb4a98527311d0b872fbc1b107443789",
    "corpus/validation.parquet": "f01d91db0154ff3e43758c31a88fa4add9aa6325d412b9d0249006b1b516deaf",
    "preference/test.parquet": "a74ac244cb418db79e7a68c4e9a8c75c8e641224646a588a3dbcfee410220960",
    "preference/train.parquet": "8987ab7b4b358f84a3700a0c0d5811f5805729b51dd1c148554db9dc05d12f5d",
    "preference/validation.parquet": "b9bdd0662824b0381b0cb6ce7c5fadc15c6796ba79e1ddf36f5c4913797e2a44",  # noqa: E501
    "sft/test.parquet": "289ea83b140b15f2291c3c91235a1ead5043d957192e55cbd157f55b120ce7f1",
    "sft/train.parquet": "ed934f972241c2be1f51b0bd7bdc918f95bf00aaa8f8ae941a4c8e02440d29bd",
    "sft/validation.parquet": "e9d383605a750dae8dac070053dee18347e1f9f145c6a0000c61dd8608d33c36",
}  # fmt: skip


def test_streaming_stage_reproduces_v2_on_demo_data(tiny_cfg) -> None:
    assert _digests(prepare_data(tiny_cfg).uri) == V2_DIGESTS


def test_output_and_key_do_not_depend_on_batches_or_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one = load_config(write_config(tmp_path / "a.yaml", tiny_config_dict(tmp_path / "s1")))
    many = tiny_config_dict(tmp_path / "s2")
    many["data"]["workers"] = 2
    many = load_config(write_config(tmp_path / "b.yaml", many))
    ref_one = prepare_data(one)
    monkeypatch.setattr(dataprep, "BATCH_ROWS", 7)  # many batches, several in flight at once
    monkeypatch.setattr(jsonl_blocks, "BLOCK_BYTES", 500)  # (JSONL sources: blocks of lines)
    ref_many = prepare_data(many)
    assert ref_one.key == ref_many.key
    assert _digests(ref_one.uri) == _digests(ref_many.uri)
    manifests = [
        json.loads((Path(r.uri) / "manifest.json").read_text()) for r in (ref_one, ref_many)
    ]
    assert [m["workers"] for m in manifests] == [1, 2]


def test_bad_line_after_many_batches_fails_with_file_line_and_publishes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Streaming: batches before the bad line were already cleaned by the workers and spooled;
    the error still names file:line and the store holds no data artifact, no spool litter."""
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": f"document number {i} " * 5}) for i in range(40)]
    path.write_text("\n".join([*lines, "{not json", *lines[:3]]) + "\n")
    d = tiny_config_dict(tmp_path / "s", data={"sources": [{"path": str(path), "format": "text"}]})
    d["data"]["workers"] = 2
    cfg = load_config(write_config(tmp_path / "c.yaml", d))
    monkeypatch.setattr(dataprep, "BATCH_ROWS", 5)
    monkeypatch.setattr(jsonl_blocks, "BLOCK_BYTES", 300)
    with pytest.raises(DataError, match=rf"{path}:41: invalid JSON"):
        prepare_data(cfg)
    store = ArtifactStore(cfg.store)
    assert store.manifests() == []
    assert not list((tmp_path / "s").rglob("*.parquet"))
