"""Offline demo data, derived from what every CPython ships: no network, identical bytes everywhere.

- `pydoc_topics.jsonl`: the language-reference topics of `pydoc_data.topics` (pretraining/RAG
  corpus; format `text`, with a `title`).
- `stdlib_qa.jsonl`: "What does `json.dumps` do?" -> the docstring's first paragraph (format
  `alpaca`; `source` names the function so retrieval can be scored later).
- `stdlib_preference.jsonl`: chosen = that answer, rejected = the same answer with one of the two
  defects small models really produce, chosen by a stable hash of the function's name (format
  `preference`): *truncated* (cut mid-sentence after about half its words: the model stopped
  early) for three functions in four, *looping* (the whole answer, then its opening words
  again: the model repeats itself) for the fourth. A reader agrees each rejected answer is
  worse, and a 1M-parameter model learns the difference (DPO's implicit-reward accuracy 0.975
  on validation pairs). Why three to one: SFT alone already ranks every looping pair right
  (0 of 63 wrong in the half-and-half mix) but a quarter of truncated ones wrong, since each
  token of a truncated answer is fluent and only its early stop is not. Only truncated pairs
  can show what DPO adds (a paired test sees the pairs the two models disagree on), so they
  are the bulk; the looping quarter checks that DPO keeps what SFT got right. Caveat: raw
  summed log-prob preference accuracy is length-biased on these pairs (a prefix is always
  more probable).
  (Another function's docstring as the rejected answer, as before, is a preference a model that
  size cannot tell apart: accuracy ~0.5.)
- `stdlib_docs.jsonl`: the full docstring of each of those functions as a document titled by its
  qualified name (format `text`): the corpus in which RAG must find a QA pair's `source`.

The generated files are committed (docstrings differ between Python versions). Regenerate with:
    python -m fasttrack.lib.demo
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import re
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent / "demo_data"
MODULES = [
    "abc",
    "argparse",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "colorsys",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "difflib",
    "enum",
    "filecmp",
    "fnmatch",
    "fractions",
    "functools",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "html",
    "http.client",
    "inspect",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "operator",
    "os",
    "os.path",
    "pathlib",
    "pickle",
    "pprint",
    "queue",
    "random",
    "re",
    "shlex",
    "shutil",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "typing",
    "urllib.parse",
    "uuid",
    "warnings",
    "zipfile",
]
QUESTIONS = ("What does `{}` do?", "Explain what `{}` is for.", "Describe the purpose of `{}`.")


def first_paragraph(doc: str) -> str:
    """The docstring's first paragraph, joined into one line."""
    para = inspect.cleandoc(doc).split("\n\n")[0]
    return " ".join(line.strip() for line in para.splitlines()).strip()


def _stable_index(text: str, n: int) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % n


DEFECTS = ("truncated", "looping")
LOOPING_ONE_IN = 4  # the share of looping pairs (see the module docstring for why)
MIN_WORDS = 6  # shorter answers have no middle to cut nor an opening worth repeating


def rejected_answer(answer: str, defect: str) -> str:
    """`answer` with `defect`: truncated cuts it mid-sentence after about half its words (no
    closing punctuation); looping appends its own opening words (about half) after it. The
    cut keeps the answer's own characters (spacing included): the defect is the only change."""
    ends = [m.end() for m in re.finditer(r"\S+", answer)]
    opening = answer[: ends[max(len(ends) // 2, 2) - 1]].rstrip(".,;:")
    if defect == "truncated":
        return opening
    if defect == "looping":
        return f"{answer} {opening}"
    raise ValueError(f"unknown defect {defect!r} (defects: {', '.join(DEFECTS)})")


def documented_functions(module_name: str) -> list[tuple[str, str, str]]:
    """(qualified name, first paragraph, full docstring) of the module's documented callables."""
    module = importlib.import_module(module_name)
    out = []
    for name in sorted(getattr(module, "__all__", None) or dir(module)):
        obj = getattr(module, name, None)
        if name.startswith("_") or not callable(obj) or inspect.isclass(obj):
            continue
        owner = getattr(obj, "__module__", None) or ""
        if (
            owner.split(".")[0].lstrip("_") != module_name.split(".")[0]
            and module_name != "os.path"
        ):
            continue  # re-exported from elsewhere
        doc = inspect.getdoc(obj)
        if not doc:
            continue
        answer = first_paragraph(doc)
        if 40 <= len(answer) <= 600 and not answer.startswith(name + "("):
            out.append((f"{module_name}.{name}", answer, doc))
    return out


def build() -> dict[str, list[dict]]:
    """All three demo datasets as lists of JSON-able rows."""
    import pydoc_data.topics

    topics = [
        {"title": title, "text": text}
        for title, text in sorted(pydoc_data.topics.topics.items())
        if len(text.strip()) > 200
    ]
    qa, pref, docs = [], [], []
    for module_name in MODULES:
        funcs = documented_functions(module_name)
        for qualname, answer, doc in funcs:
            docs.append({"title": qualname, "text": f"{qualname}\n\n{doc}"})
            question = QUESTIONS[_stable_index(qualname, len(QUESTIONS))].format(qualname)
            qa.append({"instruction": question, "input": "", "output": answer, "source": qualname})
            if len(answer.split()) >= MIN_WORDS:
                # residue 1 of 4 falls in residue 1 of 2 (looping in the former half-and-half
                # mix): the functions that stay looping are a subset of those, fewer rows move
                looping = _stable_index(qualname + "/r", LOOPING_ONE_IN) == 1
                defect = "looping" if looping else "truncated"
                rejected = rejected_answer(answer, defect)
                pref.append(
                    {"prompt": question, "chosen": answer, "rejected": rejected,
                     "defect": defect, "source": qualname}
                )  # fmt: skip
    return {
        "pydoc_topics": topics,
        "stdlib_docs": docs,
        "stdlib_qa": qa,
        "stdlib_preference": pref,
    }


def write(out_dir: Path = DEMO_DIR) -> dict[str, int]:
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, rows in build().items():
        with open(out_dir / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        counts[name] = len(rows)
    return counts


if __name__ == "__main__":
    for name, n in write().items():
        print(f"{name}: {n} rows -> {DEMO_DIR / name}.jsonl")
