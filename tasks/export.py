"""Export stage: a trained model as files other tools load, one cached artifact per format.

Formats (`export.formats`): `merged` (adapter merged into the base, safetensors, in the base's
dtype), `bnb-8bit` / `bnb-4bit` (bitsandbytes-quantized safetensors with their
`quantization_config`, loaded by a plain `AutoModelForCausalLM.from_pretrained`), `gguf-f16` /
`gguf-q8_0` (llama.cpp's format, see tasks/gguf_export.py).

Every export is measured *as loaded back from its own files by the stock loader* (never the
in-memory model that wrote them): size on disk, perplexity on the held-out split with the
evaluation protocol (tasks/perplexity.py) and its delta vs the merged model, greedy generation
tokens/s on this machine, and for GGUF the largest logit difference from the merged model on a
fixed prompt. GGUF is loaded with transformers' GGUF loader (dequantized to fp32), so its
tokens/s is transformers' speed, not llama.cpp's.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from fasttrack.core.config import RunConfig
from fasttrack.core.config_eval import EXPORT_FORMATS
from fasttrack.core.errors import ModelError
from fasttrack.core.lazy import inference_mode, lazy
from fasttrack.core.stage import BuildResult, Stage, StageSpec
from fasttrack.core.store import ArtifactRef, ArtifactStore
from fasttrack.lib.adapters import disable_cpu_bf16_repack
from fasttrack.lib.datasets import read_split
from fasttrack.lib.hub import hub_kwargs
from fasttrack.lib.models import LOAD_LOCK, load_model, model_source, pick_device
from fasttrack.lib.perplexity import strided_perplexity, token_stream
from fasttrack.lib.tables import export_row, export_table

torch = lazy("torch")  # imported on first use: a cached run never needs it

STAGE = Stage("export", "1")  # bump when this module or gguf_export.py changes what it writes
FORMATS = EXPORT_FORMATS  # the config schema's Literal
# Largest |logit - merged logit| / max |merged logit| on the fixed prompt a GGUF may show: f16
# rounding alone, and q8_0's 8-bit blocks (tests/unit/test_gguf_export.py also checks both are
# exactly the model with its weights rounded so).
GGUF_TOLERANCE = {"gguf-f16": 1e-2, "gguf-q8_0": 1e-1}
TABLE_KEY = "fasttrack-export"


def export_spec(cfg: RunConfig, model: ArtifactRef, data: ArtifactRef, fmt: str) -> StageSpec:
    if fmt not in FORMATS:
        raise ModelError(f"export.formats: unknown format {fmt!r} (formats: {', '.join(FORMATS)})")
    e = cfg.export
    config = {
        "format": fmt,
        "prompt": e.prompt,
        "speed_tokens": e.speed_tokens,
        "perplexity": cfg.evaluate.perplexity.model_dump(mode="json"),
    }
    return STAGE.spec(config, upstream={"model": model, "data": data})


def base_dtype(cfg: RunConfig, ref: ArtifactRef) -> torch.dtype:
    """The dtype the base model was published in (an adapter's: its base model's)."""
    from transformers import AutoConfig

    name, revision, _ = model_source(cfg, ref)
    adapter = Path(name) / "adapter_config.json"
    if adapter.is_file():
        name = json.loads(adapter.read_text())["base_model_name_or_path"]
    config = AutoConfig.from_pretrained(name, **hub_kwargs(cfg, revision))
    dtype = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def save_quantized(merged_dir: Path, out: Path, bits: int) -> None:
    """Load the merged model quantized by bitsandbytes and save it (weights stay quantized)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if bits == 8:
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    else:
        bnb = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
        )
    with LOAD_LOCK:  # one model load per process at a time (fasttrack/lib/models.py)
        model = AutoModelForCausalLM.from_pretrained(
            str(merged_dir), quantization_config=bnb, device_map={"": pick_device()}
        )
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(merged_dir)).save_pretrained(out)


def write_export(fmt: str, merged: Any, tok: Any, merged_dir: Path, out: Path) -> None:
    """The files of one format under `out` (merged_dir: the merged model saved already)."""
    if fmt == "merged":
        shutil.copytree(merged_dir, out, dirs_exist_ok=True)
    elif fmt.startswith("bnb-"):
        save_quantized(merged_dir, out, 8 if fmt == "bnb-8bit" else 4)
    else:
        from fasttrack.lib.gguf_export import write_gguf

        write_gguf(merged, tok, out / gguf_name(fmt), fmt.removeprefix("gguf-"))


def gguf_name(fmt: str) -> str:
    return f"model-{fmt.removeprefix('gguf-')}.gguf"


def load_export(fmt: str, path: Path) -> tuple[Any, Any]:
    """(model, tokenizer) of an export, loaded only by stock transformers from its files."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": gguf_name(fmt)} if fmt.startswith("gguf-") else {}
    if fmt.startswith("bnb-"):
        kwargs["device_map"] = {"": pick_device()}
    with LOAD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs).eval()
    if fmt == "bnb-4bit":
        # On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights on the first forward
        # and its repack fails on layers narrower than its 64-wide quant block ("shape
        # '[32, 0]' is invalid", tiny models): the measurement takes the plain dequantising
        # kernel, which computes the same product on every CPU.
        disable_cpu_bf16_repack(model)
    tok = AutoTokenizer.from_pretrained(str(path), **kwargs)
    return model, tok


def perplexity(cfg: RunConfig, model: Any, tok: Any, texts: list[str]) -> float:
    p = cfg.evaluate.perplexity
    ids, n_bytes = token_stream(texts, tok, p.max_tokens)
    device = next(model.parameters()).device
    res = strided_perplexity(
        model, ids, max_length=p.max_length, stride=p.stride, batch_size=p.batch_size,
        text_bytes=n_bytes, device=device,
    )  # fmt: skip
    return res.perplexity


@inference_mode
def tokens_per_second(model: Any, tok: Any, prompt: str, n: int) -> float:
    """Greedy generation of exactly `n` new tokens (EOS ignored), after one warm-up token."""
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    ids = ids.to(next(model.parameters()).device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    kwargs = {"do_sample": False, "pad_token_id": pad}
    model.generate(ids, max_new_tokens=1, **kwargs)
    started = time.perf_counter()
    model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
    return n / (time.perf_counter() - started)


@inference_mode
def logit_error(reference: Any, model: Any, tok: Any, prompt: str) -> float:
    """max |logits - reference logits| / max |reference logits| on `prompt` (fp32 compare)."""
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    want = reference(ids.to(next(reference.parameters()).device)).logits.float().cpu()
    got = model(ids.to(next(model.parameters()).device)).logits.float().cpu()
    return float((want - got).abs().max() / want.abs().max())


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def build_export(cfg: RunConfig, spec: StageSpec, out: Path) -> BuildResult:
    fmt = spec.config["format"]
    store = ArtifactStore(cfg.store)
    model_ref = spec.upstream["model"]
    dtype = base_dtype(cfg, model_ref)
    merged, tok = load_model(cfg, model_ref, dtype=torch.float32)  # merge in fp32, then cast
    work = store.work_dir("export", spec.key)
    merged_dir = work / "merged"
    shutil.rmtree(merged_dir, ignore_errors=True)
    merged.to(dtype).save_pretrained(merged_dir)
    tok.save_pretrained(merged_dir)
    # The reference every format is compared with: the merged model as a user loads it (the
    # in-memory one would also have its fp32 rotary buffers cast to the base dtype).
    merged, tok = load_export("merged", merged_dir)
    write_export(fmt, merged, tok, merged_dir, out)
    size = dir_size(out)

    texts = [r["text"] for r in read_split(store, spec.upstream["data"], "corpus",
                                           cfg.evaluate.perplexity.split)]  # fmt: skip
    if not texts:
        raise ModelError(f"export: the {cfg.evaluate.perplexity.split} split has no documents")
    ref_ppl = perplexity(cfg, merged, tok, texts)
    model, etok = load_export(fmt, out)
    ppl = perplexity(cfg, model, etok, texts)
    e = cfg.export
    metrics: dict[str, Any] = {
        "format": fmt,
        "size_bytes": size,
        "perplexity": round(ppl, 4),
        "perplexity_merged": round(ref_ppl, 4),
        "perplexity_delta": round(ppl - ref_ppl, 4),
        "tokens_per_second": round(tokens_per_second(model, etok, e.prompt, e.speed_tokens), 1),
        "dtype": str(dtype).removeprefix("torch."),
    }
    if fmt.startswith("gguf-"):
        err = logit_error(merged, model, etok, e.prompt)
        metrics |= {"logit_max_rel_err": round(err, 6), "logit_tolerance": GGUF_TOLERANCE[fmt]}
    (out / "export.md").write_text(export_table([export_row(metrics, spec.key)]))
    return BuildResult(metrics=metrics, device={"device": pick_device(), "dtype": metrics["dtype"]})


def publish_exports(refs: list[ArtifactRef], run_name: str) -> list[dict[str, Any]]:
    """The export table of a run: rows, and a Prefect table artifact when inside a run."""
    from fasttrack.core.progress import in_prefect_run

    rows = [export_row(r.metrics, r.key) for r in refs]
    if rows and in_prefect_run():
        from prefect.artifacts import create_table_artifact

        create_table_artifact(
            table=rows, key=TABLE_KEY, description=f"FastTrack exports of run `{run_name}`"
        )
    return rows


def export_target(cfg: RunConfig, models: dict[str, ArtifactRef]) -> ArtifactRef:
    """The model `export.model` names among the run's models (newest: DPO > SFT > ...)."""
    from fasttrack.lib.chain import MODEL_ORDER

    wanted = cfg.export.model
    for stage in MODEL_ORDER if wanted == "newest" else (wanted,):
        if stage in models:
            return models[stage]
    raise ModelError(
        f"export.model: run {cfg.name!r} has no {wanted} model in {cfg.store} "
        f"(it has: {', '.join(models) or 'none'})"
    )


export_model, export_task = STAGE.define(export_spec, build_export)
