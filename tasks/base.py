"""Base stage: the model every training stage starts from.

For `scratch` the artifact holds a byte-level BPE tokenizer trained on the corpus (with
pad/bos/eos and a chat template) and a freshly initialised tiny Llama; for a local dir or hub id
it holds only a pointer + fingerprint, so a multi-GB model is never copied, yet a changed
tokenizer or template still changes every key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fasttrack.core.config import RunConfig
from fasttrack.core.errors import ModelError
from fasttrack.core.lazy import lazy
from fasttrack.core.stage import BuildResult, Stage, StageSpec
from fasttrack.core.store import ArtifactRef, ArtifactStore
from fasttrack.core.templates import DEFAULT_TEMPLATE, resolve
from fasttrack.lib.hub import check_model_dir, hub_kwargs
from fasttrack.lib.models import (
    CHAT_TEMPLATE,
    LOAD_LOCK,
    POINTER,
    build_tokenizer,
    fingerprint_dir,
    is_local_path,
    load_pretrained,
    tokenizer_facts,
)

torch = lazy("torch")  # imported on first use: a cached run never needs it

STAGE = Stage("base", "1")


def base_spec(cfg: RunConfig, data: ArtifactRef | None = None) -> StageSpec:
    m = cfg.model
    name = m.name_or_path
    config: dict[str, Any] = {
        "name_or_path": name,
        "revision": m.revision,
        "chat_template": resolve(m.chat_template),  # the Jinja text: a changed file changes keys
        "trust_remote_code": m.trust_remote_code,
    }
    if m.resize_embeddings:  # only when set, so the keys of existing runs stay as they were
        config["resize_embeddings"] = True
    if name == "scratch":
        if data is None:
            raise ModelError("model.name_or_path: scratch needs the data stage (a corpus)")
        config |= {
            "tokenizer": m.tokenizer.model_dump(),
            "architecture": m.architecture.model_dump(),
        }
        return STAGE.spec(config | {"seed": cfg.seed}, upstream={"data": data})
    config["default_template"] = DEFAULT_TEMPLATE  # used when the model has no template
    if is_local_path(name):
        path = Path(name).expanduser()
        check_model_dir(path, m.allow_pickle)
        return STAGE.spec(config, inputs={"model_dir": fingerprint_dir(path)})
    return STAGE.spec(config, inputs={"hub": f"{name}@{m.revision or 'main'}"})


def build_base(cfg: RunConfig, spec: StageSpec, out: Path) -> BuildResult:
    m = cfg.model
    if m.name_or_path != "scratch":
        model, tok = load_pretrained(cfg, m.name_or_path, m.revision, spec.config["chat_template"])
        rows = model.get_input_embeddings().num_embeddings
        if m.resize_embeddings and len(tok) > rows:
            # a real model dir, not a pointer: every later stage loads the grown matrix
            model.resize_token_embeddings(len(tok))
            model.save_pretrained(out)
            tok.save_pretrained(out)
        else:
            (out / POINTER).write_text(json.dumps({**spec.config, **spec.inputs}, indent=2))
        n_params = sum(p.numel() for p in model.parameters())
        from transformers import AutoConfig  # as stored (the loaded model may be upcast)

        stored = AutoConfig.from_pretrained(m.name_or_path, **hub_kwargs(cfg, m.revision))
        metrics = {"parameters": n_params, **tokenizer_facts(tok, stored)}
        return BuildResult(metrics=metrics | ({"resized_from": rows} if len(tok) > rows else {}))
    from transformers import LlamaConfig, LlamaForCausalLM

    from fasttrack.lib.datasets import read_split

    store = ArtifactStore(cfg.store)
    texts = [r["text"] for r in read_split(store, spec.upstream["data"], "corpus", "train")]
    template = resolve(m.chat_template) or CHAT_TEMPLATE
    tok = build_tokenizer(texts, m.tokenizer.vocab_size, m.tokenizer.min_frequency, template)
    a = m.architecture
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_hidden_layers,
        num_attention_heads=a.num_attention_heads,
        num_key_value_heads=a.num_key_value_heads,
        max_position_embeddings=a.max_position_embeddings,
        tie_word_embeddings=a.tie_word_embeddings,
        rope_theta=a.rope_theta,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    with LOAD_LOCK:  # no other thread's from_pretrained may turn these weights into meta
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    return BuildResult(metrics={"parameters": n_params, **tokenizer_facts(tok, config)})


resolve_base, base_task = STAGE.define(base_spec, build_base)
