"""The table of bad inputs: each case builds its input, names the CLI call and the one error
line it must produce. tests/e2e/test_bad_inputs.py runs them; docs/errors.md is rendered from
them (regenerate: `python -m tests.e2e.bad_inputs > docs/errors.md`), so the two cannot drift.

A `shape` is the exact error line with placeholders: `<file>` = the culprit's path, `<n>` = a
number, `…` = any text.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import alias_bomb, tiny_config_dict, write_config


@dataclass(frozen=True)
class Ctx:
    """Where a case builds its files: `tmp` (its own dir), `store`, and a good model dir."""

    tmp: Path
    store: Path
    model: Path


@dataclass(frozen=True)
class Case:
    id: str
    group: str  # config | cli | data | model
    input: str  # what is wrong, for the docs
    make: Callable[[Ctx], tuple[list[str], Path | str]]  # -> (CLI args, culprit)
    shape: str
    stage: str | None = None  # the step that must publish nothing (None: nothing at all)

    def pattern(self, culprit: Path | str) -> re.Pattern[str]:
        parts = re.split(r"(<file>|<n>|…)", self.shape)
        subs = {"<file>": re.escape(str(culprit)), "<n>": r"\d+", "…": ".*"}
        return re.compile("".join(subs.get(p, re.escape(p)) for p in parts))


def _file(ctx: Ctx, name: str, content: str | bytes) -> Path:
    path = ctx.tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _cfg(ctx: Ctx, **sections: Any) -> Path:
    return write_config(ctx.tmp / "run.yaml", tiny_config_dict(ctx.store, **sections))


def _run(ctx: Ctx, *extra: str, **sections: Any) -> list[str]:
    return ["run", str(_cfg(ctx, **sections)), *extra]


def config_text(ctx: Ctx, text: str | bytes, *extra: str) -> tuple[list[str], Path]:
    path = _file(ctx, "bad.yaml", text)
    return ["run", str(path), *extra], path


def good_yaml(ctx: Ctx, **sections: Any) -> str:
    return yaml.safe_dump(tiny_config_dict(ctx.store, **sections), sort_keys=False)


def source_case(path_of: Callable[[Ctx], Path | str], fmt: str = "text"):
    """A run of the data stage on one source (the culprit)."""

    def make(ctx: Ctx) -> tuple[list[str], Path | str]:
        path = path_of(ctx)
        sources = [{"path": str(path), "format": fmt}]
        return _run(ctx, "--stages", "data", data={"sources": sources}), path

    return make


def data_case(name: str, content: str | bytes, fmt: str = "text"):
    """A run of the data stage on one source file with this content."""
    return source_case(lambda ctx: _file(ctx, name, content), fmt)


def model_case(
    change: Callable[[Path], Any], stages: str = "pretrain", extra: dict | None = None, **model: Any
):
    """A run of `stages` whose base model is a copy of the good tiny model, changed by `change`
    (None: no copy, a path that does not exist)."""

    def make(ctx: Ctx) -> tuple[list[str], Path]:
        path = ctx.tmp / "model"
        if change is not None:
            shutil.copytree(ctx.model, path)
            change(path)
        data = {"sources": [{"path": "demo:pydoc_topics", "format": "text", "max_rows": 30}]}
        sections = {"model": {"name_or_path": str(path), **model}, "data": data, **(extra or {})}
        return _run(ctx, "--stages", stages, **sections), path

    return make


def _shrink_embeddings(path: Path) -> None:
    """A checkpoint whose embedding matrix has fewer rows than its tokenizer has tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path)
    model.resize_token_embeddings(len(AutoTokenizer.from_pretrained(path)) - 8)
    model.save_pretrained(path)


def _relative_source(ctx: Ctx) -> tuple[list[str], Path]:
    """A relative source path resolves beside the config, not in the working directory."""
    sources = [{"path": "missing.jsonl", "format": "text"}]
    return _run(ctx, "--stages", "data", data={"sources": sources}), ctx.tmp / "missing.jsonl"


def _rag_eval_case(ctx: Ctx) -> tuple[list[str], Path]:
    path = _file(ctx, "questions.jsonl", '{"question": "where is open?"}\n')
    return _run(ctx, "--stages", "rag", rag={"eval": {"path": str(path)}}), path


def _config_path(ctx: Ctx, stages: str, **sections: Any) -> tuple[list[str], Path]:
    args = _run(ctx, "--stages", stages, **sections)
    return args, ctx.tmp / "run.yaml"


def _pickle_only(path: Path) -> None:
    from safetensors.torch import load_file
    from torch import save

    save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def remote_code(path: Path, code: str = "raise ImportError('remote code ran')\n") -> None:
    """Make `path` a model of an unknown type whose classes live in its own custom.py."""
    import json

    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "custom_tiny"
    config["auto_map"] = {
        "AutoConfig": "custom.CustomConfig",
        "AutoModelForCausalLM": "custom.CustomModel",
    }
    (path / "config.json").write_text(json.dumps(config))
    (path / "custom.py").write_text(code)


def _docs_dir(ctx: Ctx) -> Path:
    (ctx.tmp / "docs").mkdir()
    (ctx.tmp / "docs" / "notes.pdf").write_bytes(b"%PDF-1.4")
    return ctx.tmp / "docs"


def _truncated_parquet() -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"text": ["a parquet row"] * 100}), buf)
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def _no_tokenizer(path: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (path / name).unlink()


def _symlinked_artifact(ctx: Ctx) -> tuple[list[str], Path]:
    """`<store>/data/<key>` a symlink to a directory elsewhere."""
    elsewhere = ctx.tmp / "elsewhere"
    elsewhere.mkdir()
    link = ctx.store / "data" / ("ab" * 32)
    link.parent.mkdir(parents=True)
    link.symlink_to(elsewhere)
    return ["gc", "--store", str(ctx.store)], link


BIG_LINE = '{"text": "' + "word " * 2_000_000 + '"}\n'  # 10 MB on one line
CFG = "<file>"

CASES: list[Case] = [
    # --- config (rejected before Prefect starts) ---------------------------------------------
    Case("config-missing", "config", "config path does not exist",
         lambda c: (["run", str(c.tmp / "absent.yaml")], c.tmp / "absent.yaml"),
         f"{CFG}: config file not found"),
    Case("config-directory", "config", "config path is a directory",
         lambda c: (["run", str(c.tmp)], c.tmp), f"{CFG}: is a directory, not a config file"),
    Case("config-yaml-syntax", "config", "YAML syntax error (unclosed `[`)",
         lambda c: config_text(c, "data: [\n"), f"{CFG}:2:1: YAML syntax error: …"),
    Case("config-not-utf8", "config", "config saved as latin-1",
         lambda c: config_text(c, "name: caf\xe9\n".encode("latin-1")),
         f"{CFG}:1: not valid UTF-8 (invalid continuation byte); save it as UTF-8"),
    Case("config-not-mapping", "config", "top level is a list",
         lambda c: config_text(c, "- data\n"),
         f"{CFG}: top level must be a mapping of sections, got list"),
    Case("config-unknown-key", "config", "unknown (misspelt) key",
         lambda c: config_text(c, good_yaml(c) + "pretrian: {max_steps: 5}\n"),
         f"{CFG}:<n>: pretrian: unknown key (allowed: …)"),
    Case("config-duplicate-key", "config", "the same section given twice",
         lambda c: config_text(c, good_yaml(c) + "pretrain: {max_steps: 5}\n"),
         f"{CFG}:<n>: pretrain: duplicate key (first given at line <n>)"),
    Case("config-alias-bomb", "config", "YAML alias bomb (\"billion laughs\", 10 levels)",
         lambda c: config_text(c, alias_bomb(10)),
         f"{CFG}: the YAML expands to more than <n> values (nested aliases?); refused"),
    Case("config-wrong-type", "config", "a string where an integer belongs",
         lambda c: config_text(c, good_yaml(c).replace("max_steps: 40", "max_steps: lots")),
         f"{CFG}:<n>: pretrain.max_steps: Input should be a valid integer, …"),
    Case("config-bad-enum", "config", "unknown data format",
         lambda c: config_text(c, good_yaml(c).replace("format: alpaca", "format: csv")),
         f"{CFG}:<n>: data.sources.1.format: Input should be 'text', …"),
    Case("config-rag-engine", "config", "RAG embedding engine that does not exist",
         lambda c: config_text(c, good_yaml(c, rag={"engine": "ray"})),
         f"{CFG}:<n>: rag.engine: Input should be 'local' or 'dask'"),
    Case("config-missing-section", "config", "no `data` section",
         lambda c: config_text(c, "name: x\n"), f"{CFG}: data: Field required"),
    Case("config-cross-field", "config", "block_size larger than the model's positions",
         lambda c: config_text(c, good_yaml(c).replace("block_size: 64", "block_size: 512")),
         f"{CFG}: (top level): pretrain.block_size (512) is larger than "
         "model.architecture.max_position_embeddings (128)"),
    Case("config-bad-gate", "config", "promotion gate that does not parse",
         lambda c: config_text(c, good_yaml(c, evaluate={"gates": ["sft.rougeL >>= 1"]})),
         f"{CFG}:<n>: evaluate: gates.0: 'sft.rougeL >>= 1' is not `<model>.<metric> <op> …"),
    Case("config-unknown-template", "config", "unknown chat template name",
         lambda c: config_text(c, good_yaml(c, model={"chat_template": "vicuna"})),
         f"{CFG}:<n>: model.chat_template: 'vicuna' is not a template name (chatml, llama3, "
         "gemma, phi3, mistral, alpaca), a Jinja string or a .jinja file"),
    Case("config-template-file-missing", "config", "`.jinja` template file that does not exist",
         lambda c: config_text(c, good_yaml(c, model={"chat_template": "nope.jinja"})),
         f"{CFG}:<n>: model.chat_template: cannot read template file nope.jinja (relative to "
         "…): No such file or directory"),
    Case("config-raft-no-oracle-slot", "config", "RAFT context whose distractors fill all k",
         lambda c: config_text(c, good_yaml(c, sft={"rag_context": {"k": 2, "distractors": 2}})),
         f"{CFG}:<n>: sft.rag_context: distractors (2) must be smaller than k (2): the oracle "
         "needs a slot"),
    Case("set-no-equals", "config", "`--set` without `=`",
         lambda c: (_run(c, "--set", "pretrain.max_steps"), ""),
         "--set pretrain.max_steps: expected KEY=VALUE, e.g. pretrain.max_steps=50"),
    Case("set-bad-value", "config", "`--set` value out of range",
         lambda c: (_run(c, "--set", "pretrain.learning_rate=-1"), c.tmp / "run.yaml"),
         f"{CFG}: --set pretrain.learning_rate=-1: pretrain.learning_rate: Input should be "
         "greater than 0"),
    Case("set-unknown-key", "config", "`--set` of an unknown key",
         lambda c: (_run(c, "--set", "pretrain.stepz=5"), c.tmp / "run.yaml"),
         f"{CFG}: --set pretrain.stepz=5: pretrain.stepz: unknown key (allowed: …)"),
    Case("set-not-a-section", "config", "`--set` through a scalar",
         lambda c: (_run(c, "--set", "seed.x=1"), ""),
         "--set seed.x=1: seed is not a section"),
    # --- CLI arguments ----------------------------------------------------------------------
    Case("cli-unknown-stage", "cli", "`--stages` names an unknown stage",
         lambda c: (_run(c, "--stages", "data,trian"), "trian"),
         "--stages: unknown stage '<file>' (stages: …)"),
    Case("cli-unknown-force", "cli", "`--force` names an unknown step",
         lambda c: (_run(c, "--force", "pretrian"), "pretrian"),
         "--force: unknown step '<file>' (steps: …)"),
    Case("cli-unknown-option", "cli", "unknown option",
         lambda c: (_run(c, "--forse", "data"), "--forse"),
         "fasttrack run: No such option: <file> …"),
    Case("cli-unknown-command", "cli", "unknown command",
         lambda c: (["trian"], "trian"), "fasttrack: No such command '<file>'."),
    Case("cli-ask-extra-args", "cli", "`ask` with an unquoted question",
         lambda c: (["ask", "cfg.yaml", "what", "is"], ""),
         'ask: expected [CONFIG] "question" (quote the question)'),
    Case("cli-plan-bad-size", "cli", "`plan --gpu-mem` not a size",
         lambda c: (["plan", str(_cfg(c)), "--gpu-mem", "lots"], "lots"),
         "--gpu-mem <file>: …"),
    Case("cli-report-unknown-run", "cli", "`report` of a run the store does not have",
         lambda c: (["report", "nope", "--store", str(c.store)], c.store),
         "report: no report of 'nope' in <file> (runs: none)"),
    # --- the store ----------------------------------------------------------------------------
    Case("store-symlinked-artifact", "store", "an artifact directory that is a symlink (`gc`)",
         _symlinked_artifact,
         "gc: nothing removed: <file> is a symlink (to …); the store refuses symlinked "
         "artifacts: replace it with a copy or remove it"),
    Case("cli-serve-unset-key-env", "cli", "`serve --api-key-env` names an unset variable",
         lambda c: (["serve", str(_cfg(c)), "--api-key-env", "FASTTRACK_UNSET_KEY"],
                    "FASTTRACK_UNSET_KEY"),
         "--api-key-env <file>: the environment variable is not set or empty"),
    Case("cli-serve-untrained-run", "cli", "`serve` a run that trained nothing yet",
         lambda c: (["serve", str(_cfg(c))], c.store),
         "no data artifact for run 'test-tiny' in <file>: run `fasttrack run` first"),
    Case("cli-serve-bad-engine", "cli", "`serve --engine` names an unknown engine",
         lambda c: (["serve", str(_cfg(c)), "--engine", "tgi"], "tgi"),
         "serve --engine <file>: unknown engine (engines: transformers, vllm)"),
    Case("cli-serve-vllm-without-cuda", "cli",
         "`serve --engine vllm` where vllm or a CUDA device is missing (skipped where both are)",
         lambda c: (["serve", str(_cfg(c)), "--engine", "vllm"], "vllm"),
         "serve --engine <file>: …; serve with --engine transformers"),
    Case("cli-export-unknown-format", "cli", "`export --format` names an unknown format",
         lambda c: (["export", str(_cfg(c)), "--format", "gguf-q4"], "gguf-q4"),
         "--format: unknown format '<file>' (formats: …)"),
    Case("cli-export-no-format", "cli", "`export` with no format given or configured",
         lambda c: (["export", str(_cfg(c))], ""),
         "export: no format: pass --format or set export.formats in the config"),
    Case("cli-export-untrained", "cli", "`export` of a run the store has nothing of",
         lambda c: (["export", str(_cfg(c)), "--format", "merged"], c.store),
         "no data artifact for run 'test-tiny' in <file>: run `fasttrack run` first"),
    Case("cli-sweep-grid-syntax", "cli", "`sweep --grid` without values",
         lambda c: (["sweep", str(_cfg(c)), "--grid", "dpo.beta"], "dpo.beta"),
         "--grid <file>: expected FIELD=V1,V2,..., e.g. dpo.beta=0.05,0.1"),
    Case("cli-sweep-unknown-field", "cli", "`sweep --grid` over a field the config lacks",
         lambda c: (["sweep", str(_cfg(c)), "--grid", "dpo.betta=0.1,0.2"], _cfg(c)),
         "sweep point 0 (dpo.betta=0.1): <file>: --set dpo.betta=0.1: dpo.betta: unknown key "
         "(allowed: …)"),
    Case("cli-sweep-bad-value", "cli", "a `sweep --grid` value the field rejects",
         lambda c: (["sweep", str(_cfg(c)), "--grid", "dpo.beta=0.1,-1"], _cfg(c)),
         "sweep point 1 (dpo.beta=-1): <file>: --set dpo.beta=-1: dpo.beta: Input should be "
         "greater than 0"),
    Case("cli-compare-unknown-run", "cli", "`compare` a run the store has no report of",
         lambda c: (["compare", "a", "b", "--store", str(c.store)], c.store),
         "report: no report of 'a' in <file> (runs: none)"),
    # --- data files (found by the data stage, inside the flow) ------------------------------
    Case("data-missing-file", "data", "source file does not exist",
         source_case(lambda c: c.tmp / "nope.jsonl"),
         "…: data.sources.0.path: <file>: source file not found (relative paths resolve "
         "against the config file's folder)", "data"),
    Case("data-relative-missing", "data", "relative source path, not beside the config file",
         _relative_source,
         "…: data.sources.0.path: <file>: source file not found (relative paths resolve "
         "against the config file's folder)", "data"),
    Case("data-unknown-demo", "data", "unknown `demo:` source",
         source_case(lambda c: "demo:nope"),
         "<file>: no such demo source (available: …)", "data"),
    Case("data-empty-dir", "data", "folder with no supported files",
         source_case(_docs_dir),
         "<file>: folder has no data files (…)", "data"),
    Case("data-empty-file", "data", "empty .jsonl", data_case("e.jsonl", ""),
         "<file>: file is empty", "data"),
    Case("data-truncated-parquet", "data", "parquet cut in half",
         data_case("t.parquet", _truncated_parquet()), "<file>: unreadable parquet (…)",
         "data"),
    Case("data-latin1-jsonl", "data", "latin-1 bytes in a UTF-8 .jsonl",
         data_case("l.jsonl", '{"text": "ok"}\n{"text": "caf\xe9"}\n'.encode("latin-1")),
         "<file>:2: not valid utf-8 (byte <n> of the line: invalid continuation byte); set "
         "data.encoding or re-encode the file", "data"),
    Case("data-utf16-jsonl", "data", "UTF-16 .jsonl (Windows export)",
         data_case("u.jsonl", '{"text": "hello"}\n'.encode("utf-16")),
         "<file>: UTF-16 text (byte-order mark), not utf-8; set data.encoding: utf-16", "data"),
    Case("data-invalid-json", "data", "a JSONL line that is not JSON",
         data_case("j.jsonl", '{"text": "a b c"}\n{"text": oops}\n'),
         "<file>:2: invalid JSON (Expecting value at column <n>)", "data"),
    Case("data-non-object", "data", "a JSONL line that is an array",
         data_case("a.jsonl", '{"text": "a b c"}\n[1, 2]\n'),
         "<file>:2: expected a JSON object, got list", "data"),
    Case("data-csv-ragged", "data", "CSV row with an extra field",
         data_case("r.csv", "text,title\na b c,t\nd e f,t,extra\n"),
         "<file>:3: malformed CSV: Expected 2 fields in line 3, saw 3", "data"),
    Case("data-csv-short-row", "data", "CSV row with a missing field",
         data_case("short.csv", "text,title\nhello there,t\nworld\n"),
         "<file>:3: malformed CSV: Expected 2 fields in line 3, saw 1", "data"),
    Case("data-missing-column", "data", "column of the declared format missing",
         data_case("m.jsonl", '{"question": "q", "answer": "a"}\n', "alpaca"),
         "<file>:1: missing column 'instruction' for format alpaca; columns are: question, "
         "answer", "data"),
    Case("data-wrong-type", "data", "text field is a number",
         data_case("n.jsonl", '{"text": 42}\n'),
         "<file>:1: field 'text' must be a string, got int", "data"),
    Case("data-unknown-role", "data", "chat turn with an unknown role",
         data_case("r.jsonl", '{"messages": [{"role": "wizard", "content": "hi"}]}\n',
                   "messages"),
         "<file>:1: messages[0]: unknown role 'wizard'", "data"),
    Case("data-10mb-line", "data", "a 10 MB single JSONL line (over data.max_record_chars)",
         data_case("big.jsonl", BIG_LINE),
         "<file>:1: record longer than data.max_record_chars (1,000,000 characters); split "
         "it, or raise the limit (null = none)", "data"),
    Case("data-empty-after-cleaning", "data", "every row shorter than clean.min_chars",
         data_case("s.jsonl", '{"text": "   "}\n{"text": "\\t"}\n'),
         "data: the corpus dataset is empty after cleaning: …", "data"),
    Case("rag-eval-missing-column", "data", "`rag.eval` file without the expected column",
         _rag_eval_case,
         "<file>:1: missing column 'expected' (rag.eval.columns.expected); columns are: "
         "question", "rag"),
    Case("lm-eval-include-missing", "data", "`evaluate.lm_eval.include_path` is not a folder",
         lambda c: (_run(c, evaluate={"lm_eval": {"tasks": ["t"], "include_path": str(
             c.tmp / "no-tasks")}}), c.tmp / "no-tasks"),
         "…: evaluate.lm_eval.include_path: <file>: no such folder (relative paths resolve "
         "against the config file's folder)"),
    Case("secret-block-missing", "data", "`hf_token_secret` names no Prefect Secret block",
         lambda c: (_run(c, "--stages", "data", hf_token_secret="no-such-block"), ""),
         "hf_token_secret: no Prefect Secret block named 'no-such-block' (…)", "data"),
    # --- model directories (found by the base step) -----------------------------------------
    Case("model-no-config", "model", "model dir without config.json",
         model_case(lambda p: (p / "config.json").unlink()),
         "model.name_or_path: <file>: not a model directory (no config.json)", "base"),
    Case("model-bad-config", "model", "config.json is not JSON",
         model_case(lambda p: (p / "config.json").write_text("{oops")),
         "model.name_or_path: <file>/config.json: not valid JSON (…)", "base"),
    Case("model-pickle-only", "model", "pickle-only checkpoint (pytorch_model.bin)",
         model_case(_pickle_only),
         "model.name_or_path: <file>: only pickle weights (pytorch_model.bin), which can run "
         "code when loaded; convert them to safetensors or set model.allow_pickle: true", "base"),
    Case("model-corrupt-safetensors", "model", "truncated model.safetensors",
         model_case(lambda p: _truncate(p / "model.safetensors")),
         "model.name_or_path: <file>/model.safetensors: corrupt safetensors file (…)", "base"),
    Case("model-no-weights", "model", "model dir without weights",
         model_case(lambda p: (p / "model.safetensors").unlink()),
         "model.name_or_path: <file>: no weights (*.safetensors)", "base"),
    Case("model-no-tokenizer", "model", "model dir without tokenizer files",
         model_case(_no_tokenizer),
         "model.name_or_path: <file>: no tokenizer files (one of: …)", "base"),
    Case("model-remote-code", "model", "model that needs its own Python code (auto_map)",
         model_case(remote_code),
         "model.name_or_path: cannot load '<file>': it ships its own Python code; set "
         "model.trust_remote_code: true if you trust it", "base"),
    Case("model-dir-missing", "model", "model path that does not exist",
         model_case(None),
         "…: model.name_or_path: <file>: no such model directory (relative paths resolve "
         "against the config file's folder)", "base"),
    Case("plan-model-dir-missing", "model", "`plan` of a config whose model path does not exist",
         lambda c: (["plan", str(_cfg(c, model={"name_or_path": str(c.tmp / "model")}))],
                    c.tmp / "model"),
         "…: model.name_or_path: <file>: no such model directory (relative paths resolve "
         "against the config file's folder)", "base"),
    Case("model-vocab-too-large", "model", "tokenizer larger than the embedding matrix",
         model_case(_shrink_embeddings),
         "…: model.name_or_path: <file>: the tokenizer has <n> tokens but the embedding matrix "
         "only <n> rows; set model.resize_embeddings: true to grow it (…)", "base"),
    Case("model-lora-target-missing", "model", "`sft.lora.target_modules` names no module",
         model_case(lambda p: None, "sft", {"sft": {"lora": {"target_modules": ["c_attn"]}}}),
         "…: sft.lora.target_modules: c_attn name no Linear module of the model; its Linear "
         "modules are: …", "base"),
    Case("length-past-positions", "config", "sft.max_length past the model's positions",
         lambda c: _config_path(c, "sft", sft={"max_length": 256}),
         "<file>:<n>: sft.max_length (256) is larger than the model's max_position_embeddings "
         "(128) (scratch)", "data"),
]  # fmt: skip


# Found while training (tests/e2e/test_nan_guard.py poisons one batch's loss).
NAN_CASE = Case(
    "train-nan-loss",
    "training",
    "a batch whose loss is NaN/inf (`nan_policy: abort`, default)",
    lambda c: ([], "pretrain"),
    "<file>: loss is nan at step <n>; nothing published. Lower <file>.learning_rate, check the "
    "data, or set <file>.nan_policy: skip",
    "pretrain",
)

# File-system faults, exercised for real by tests/e2e/test_fs_faults.py (a read-only bind mount
# and a nearly full tmpfs over the store); `<file>` is the failing stage, then the store.
FS_CASES = [
    Case("fs-disk-full", "file system",
         "disk full while a checkpoint, the trained model, staging or the manifest is written",
         lambda c: ([], "pretrain"),
         "<file> …: no space left on device (disk full) writing …; nothing was published: "
         "free space and re-run", "pretrain"),
    Case("fs-read-only-store", "file system", "read-only store when a stage must be built",
         lambda c: ([], "sft"),
         "<file> …: the store … is not writable (…): cannot write …; building needs a "
         "writable store (reading works read-only)", "sft"),
]  # fmt: skip


def render_doc() -> str:
    """docs/errors.md: the table of bad inputs, their one-line errors and exit codes."""
    lines = [
        "# Errors on bad input",
        "",
        "<!-- Generated from tests/e2e/bad_inputs.py (`python -m tests.e2e.bad_inputs >",
        "docs/errors.md`); tests/e2e/test_bad_inputs.py fails when this file is stale. -->",
        "",
        f"Every one of these {len(CASES)} inputs makes `fasttrack` exit with code 2 and print",
        "exactly one line, `error: <message>`, naming the culprit (file, and line or field",
        "where it applies), with no traceback; the failing step publishes no artifact.",
        "`--verbose` shows the traceback of a failure inside the flow. In a message,",
        "`<file>` is the culprit's path, `<n>` a number, `…` elided text.",
        "",
        "| id | input | message (`error: …`) | exit |",
        "|---|---|---|---|",
    ]
    for case in CASES:
        shape = case.shape.replace("|", "\\|")
        lines.append(f"| `{case.id}` | {case.group}: {case.input} | `{shape}` | 2 |")
    lines += [
        "",
        "During training (pretrain, SFT, DPO), a non-finite loss or gradient stops the stage",
        "before the optimizer applies it; `<file>` is the stage. With `nan_policy: skip` the",
        "step is skipped instead (no weight update) up to `max_skipped_steps` times, and the",
        "manifest's metrics count `skipped_steps`.",
        "",
        "| id | input | message (`error: …`) | exit |",
        "|---|---|---|---|",
        f"| `{NAN_CASE.id}` | {NAN_CASE.group}: {NAN_CASE.input} | `{NAN_CASE.shape}` | 2 |",
        "",
        "File-system faults while a stage is built: the torn checkpoint or staging directory is",
        "removed and nothing is published; `<file>` is the stage. A read-only store can still be",
        "read: `verify`, `ls`, `report`, `ask` and a fully cached `run` work.",
        "",
        "| id | input | message (`error: …`) | exit |",
        "|---|---|---|---|",
        *(f"| `{c.id}` | {c.group}: {c.input} | `{c.shape}` | 2 |" for c in FS_CASES),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_doc(), end="")
