"""lm-evaluation-harness on the model the evaluate stage already loaded (`evaluate.lm_eval`).

`lm_eval.simple_evaluate` gets an `HFLM` wrapping the loaded model and tokenizer (no second load,
adapters and quantization as evaluated elsewhere), tasks from the harness's registry plus
`include_path` and the tasks shipped in `fasttrack/lib/lm_eval_tasks/` (offline: local YAML over
local JSONL). Scores merge into the metrics as `lm_eval.<task>.<metric>`; each document's score
goes into the per-row scores (table `lm_eval.<task>`), so they get intervals and paired tests
like every other metric.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from fasttrack.core.errors import ModelError

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
_PER_DOC = ("acc", "acc_norm", "exact_match", "f1", "bleu", "rouge1", "rougeL")


def builtin_tasks(dest: Path) -> Path:
    """A copy of the shipped task folder whose relative `data_files` point at the shipped data
    (lm-eval resolves them against the working directory)."""
    dest.mkdir(parents=True, exist_ok=True)
    for src in TASKS_DIR.iterdir():
        if src.suffix == ".yaml":
            text = re.sub(
                r"(\n\s+test: )(\S+\.jsonl)", lambda m: f"{m[1]}{TASKS_DIR / m[2]}", src.read_text()
            )
            (dest / src.name).write_text(text)
        elif src.suffix == ".jsonl":
            shutil.copy(src, dest / src.name)
    return dest


def run_lm_eval(model: Any, tok: Any, cfg: Any, seed: int, workdir: Path) -> tuple[dict, dict]:
    """(metrics `lm_eval.<task>.<metric>`, per-row score tables) of `cfg.tasks` on the model."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ModelError(
            "evaluate.lm_eval needs lm-evaluation-harness: pip install 'llm-fasttrack[eval]'"
        ) from exc
    include = [str(builtin_tasks(workdir / "lm_eval_tasks"))]
    if cfg.include_path:
        include.append(str(Path(cfg.include_path).expanduser()))
    # local tasks first: indexing the harness's thousands of task YAMLs takes minutes on a
    # loaded 2-core machine, so it happens only when a task is not one of ours / the user's
    manager = TaskManager(include_path=include, include_defaults=False)
    if any(t not in manager.all_tasks for t in cfg.tasks):
        manager = TaskManager(include_path=include)
    missing = [t for t in cfg.tasks if t not in manager.all_tasks]
    if missing:
        raise ModelError(
            f"evaluate.lm_eval.tasks: unknown task(s) {', '.join(missing)} (include_path: "
            f"{cfg.include_path or 'none'}; shipped: fasttrack_stdlib_mc)"
        )
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=cfg.batch_size, max_length=cfg.max_length)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(cfg.tasks),
        num_fewshot=cfg.num_fewshot,
        limit=cfg.limit,
        task_manager=manager,
        log_samples=True,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        bootstrap_iters=0,  # our own seeded bootstrap over the per-document scores
    )
    metrics: dict[str, float] = {}
    tables: dict[str, dict] = {}
    for task, values in out["results"].items():
        for key, value in values.items():
            name, _, _filter = key.partition(",")
            if isinstance(value, int | float) and not name.endswith(("_stderr", "sample_len")):
                metrics[f"lm_eval.{task}.{name}"] = round(float(value), 6)
        samples = sorted(out.get("samples", {}).get(task, []), key=lambda s: s["doc_id"])
        cols = [c for c in _PER_DOC if samples and isinstance(samples[0].get(c), int | float)]
        if cols:
            rows = [[float(s[c]) for c in cols] for s in samples]
            tables[f"lm_eval.{task}"] = {"columns": [f"lm_eval.{task}.{c}" for c in cols],
                                         "rows": rows}  # fmt: skip
            metrics[f"lm_eval.{task}.rows"] = len(rows)
    return metrics, tables


def tasks_hash(include_path: str | None) -> str:
    """sha256 over the shipped and the user's task files (YAML and data): part of the evaluate
    key, so an edited task or dataset is re-evaluated."""
    import hashlib

    from fasttrack.core.store import sha256_file

    h = hashlib.sha256()
    for folder in [TASKS_DIR] + ([Path(include_path).expanduser()] if include_path else []):
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(folder)}:{sha256_file(f)}\n".encode())
    return h.hexdigest()
