import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fasttrack.core.config import SourceConfig
from fasttrack.core.errors import DataError
from fasttrack.lib.sources import content_hash, load_source


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def src(path: Path | str, fmt: str, **kw) -> SourceConfig:
    return SourceConfig(path=str(path), format=fmt, **kw)


USER_ASSISTANT = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]


@pytest.mark.parametrize(
    "fmt,row,expected",
    [
        ("text", {"text": "hello world", "title": "t"}, {"text": "hello world", "title": "t"}),
        ("text", {"text": "no title"}, {"text": "no title", "title": ""}),
        (
            "alpaca",
            {"instruction": "Q?", "input": "", "output": "A."},
            {"messages": USER_ASSISTANT},
        ),
        (
            "alpaca",
            {"instruction": "Sum", "input": "1 2", "output": "3", "system": "Be brief."},
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Sum\n\n1 2"},
                    {"role": "assistant", "content": "3"},
                ]
            },
        ),
        (
            "sharegpt",
            {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]},
            {"messages": USER_ASSISTANT},
        ),
        ("messages", {"messages": USER_ASSISTANT}, {"messages": USER_ASSISTANT}),
        ("prompt_completion", {"prompt": "Q?", "completion": "A."}, {"messages": USER_ASSISTANT}),
        (
            "preference",
            {"prompt": "p", "chosen": "c", "rejected": "r", "source": "x.y"},
            {"prompt": "p", "chosen": "c", "rejected": "r", "source": "x.y"},
        ),
    ],
)
def test_every_format_maps_to_canonical_rows(
    tmp_path: Path, fmt: str, row: dict, expected: dict
) -> None:
    kind, rows = load_source(src(_jsonl(tmp_path / "d.jsonl", [row]), fmt))
    assert kind == {"text": "corpus", "preference": "preference"}.get(fmt, "sft")
    assert rows == [expected]


def test_preference_conversation_pairs(tmp_path: Path) -> None:
    row = {
        "prompt": [{"role": "user", "content": "Q?"}],
        "chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "good"}],
        "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "bad"}],
    }
    _, rows = load_source(src(_jsonl(tmp_path / "p.jsonl", [row]), "preference"))
    assert rows == [{"prompt": "Q?", "chosen": "good", "rejected": "bad"}]
    row["rejected"] = [{"role": "user", "content": "Q?"}]
    with pytest.raises(DataError, match=r"p\.jsonl:1: field 'rejected' has no assistant turn"):
        load_source(src(_jsonl(tmp_path / "p.jsonl", [row]), "preference"))


def test_column_mapping(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"q": "Q?", "a": "A.", "ref": "m.f"}])
    _, rows = load_source(
        src(path, "prompt_completion", columns={"prompt": "q", "completion": "a", "source": "ref"})
    )
    assert rows == [{"messages": USER_ASSISTANT, "source": "m.f"}]


def test_missing_mapped_column_names_file_line_and_columns(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"q": "x", "a": "y"}, {"q": "x"}])
    cfg = src(path, "prompt_completion", columns={"prompt": "q", "completion": "a"})
    with pytest.raises(
        DataError,
        match=rf"{path}:2: missing column 'a' \(mapped from field completion\).*columns are: q",
    ):
        load_source(cfg)


def test_malformed_jsonl_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "broken\n')
    with pytest.raises(DataError, match=rf"{path}:3: invalid JSON"):
        load_source(src(path, "text"))


def test_non_object_jsonl_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(DataError, match=rf"{path}:2: expected a JSON object, got list"):
        load_source(src(path, "text"))


def test_csv_tsv_parquet_json_txt_and_folders(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text('prompt,completion\n"Q?","A."\n')
    assert load_source(src(tmp_path / "a.csv", "prompt_completion"))[1] == [
        {"messages": USER_ASSISTANT}
    ]
    (tmp_path / "a.tsv").write_text("prompt\tcompletion\nQ?\tA.\n")
    assert load_source(src(tmp_path / "a.tsv", "prompt_completion"))[1] == [
        {"messages": USER_ASSISTANT}
    ]
    pq.write_table(pa.Table.from_pylist([{"text": "parquet doc"}]), tmp_path / "p.parquet")
    assert load_source(src(tmp_path / "p.parquet", "text"))[1][0]["text"] == "parquet doc"
    (tmp_path / "a.json").write_text(json.dumps([{"text": "json doc"}]))
    assert load_source(src(tmp_path / "a.json", "text"))[1][0]["text"] == "json doc"
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "one.txt").write_text("first document")
    (docs / "sub" / "two.md").write_text("# second")
    _, rows = load_source(src(docs, "text"))
    assert rows == [
        {"text": "first document", "title": "one"},
        {"text": "# second", "title": "two"},
    ]


def test_ragged_csv_row(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("prompt,completion\nQ,A\nQ,A,extra\n")
    with pytest.raises(DataError, match=rf"{path}:3: malformed CSV: .*line 3"):
        load_source(src(path, "prompt_completion"))


@pytest.mark.parametrize("name", ["e.jsonl", "e.csv", "e.txt"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_text("")
    with pytest.raises(DataError, match="file is empty"):
        load_source(src(tmp_path / name, "text"))


def test_truncated_parquet(tmp_path: Path) -> None:
    pq.write_table(pa.Table.from_pylist([{"text": "x" * 1000}] * 50), tmp_path / "p.parquet")
    data = (tmp_path / "p.parquet").read_bytes()
    (tmp_path / "p.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"p\.parquet: unreadable parquet"):
        load_source(src(tmp_path / "p.parquet", "text"))


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin.jsonl"
    path.write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=rf"{path}:1: not valid utf-8 \(byte 14 of the line"):
        load_source(src(path, "text"))
    assert load_source(src(path, "text"), encoding="latin-1")[1][0]["text"] == "caf\u00e9"


def test_missing_source_and_unknown_demo(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.jsonl: source file not found"):
        load_source(src(tmp_path / "nope.jsonl", "text"))
    with pytest.raises(
        DataError, match=r"demo:nope: no such demo source \(available: .*pydoc_topics"
    ):
        load_source(src("demo:nope", "text"))


def test_wrong_value_types_and_roles(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"text": 5}])
    with pytest.raises(DataError, match=rf"{path}:1: field 'text' must be a string, got int"):
        load_source(src(path, "text"))
    path = _jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "wizard", "content": "x"}]}])
    with pytest.raises(DataError, match=r"messages\[0\]: unknown role 'wizard'"):
        load_source(src(path, "messages"))


def test_hf_source_from_local_dataset_dirs(tmp_path: Path) -> None:
    """The hub code path (`hf://`) with local dirs: a data-files dir and a save_to_disk dir."""
    import datasets

    files = tmp_path / "hubish"
    files.mkdir()
    _jsonl(files / "train.jsonl", [{"instruction": "Q?", "output": "A."}])
    _jsonl(files / "test.jsonl", [{"instruction": "Q2?", "output": "A2."}])
    _, rows = load_source(src(f"hf://{files}:test", "alpaca"))
    assert rows[0]["messages"][0]["content"] == "Q2?"
    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list([{"prompt": "p", "chosen": "c", "rejected": "r"}])}
    ).save_to_disk(str(saved))
    kind, rows = load_source(src(f"hf://{saved}", "preference"))
    assert kind == "preference" and rows == [{"prompt": "p", "chosen": "c", "rejected": "r"}]


def test_hub_name_fails_cleanly_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"hf://no-such-owner/no-such-ds: cannot load dataset"):
        load_source(src("hf://no-such-owner/no-such-ds", "text"))


def test_content_hash_tracks_bytes(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    first = content_hash(src(path, "text"))
    assert first == content_hash(src(path, "text"))
    _jsonl(path, [{"text": "b"}])
    assert content_hash(src(path, "text")) != first
    assert content_hash(src("hf://owner/name:train", "text")) == "hf:owner/name:None:train"


def test_short_csv_row_is_an_error_not_a_dropped_row(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text('prompt,completion\nQ,A\n"multi\nline Q",A\nQ only\n')
    with pytest.raises(
        DataError, match=rf"{path}:5: malformed CSV: Expected 2 fields in line 5, saw 1"
    ):
        load_source(src(path, "prompt_completion"))
    path.write_text('prompt,completion\n"multi\nline Q",A\n\nQ,"A"\n')
    _, rows = load_source(src(path, "prompt_completion"))
    assert [r["messages"][0]["content"] for r in rows] == ["multi\nline Q", "Q"]
