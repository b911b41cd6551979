"""Chat templates, stop tokens, document BOS, LoRA on Conv1D, saved dtype: per-family rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor

from fasttrack.core import templates
from fasttrack.core.config import LoraConfig
from fasttrack.core.config_eval import GenerationConfig
from fasttrack.core.errors import ConfigError
from fasttrack.lib.generate import generation_kwargs
from tests.conftest import tiny_config_dict, write_config
from tests.e2e.families import BY_NAME, build_family, corpus


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory: pytest.TempPathFactory):
    """Build a family's tiny checkpoint once per module."""
    built: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("fam")
    texts = corpus()[:30]

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_family(BY_NAME[name], root / name, texts)
        return built[name]

    return get


class Scripted(LogitsProcessor):
    """Forces the next token to be script[step]: generation then depends only on stop rules."""

    def __init__(self, script: list[int]):
        self.script = script

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = min(self.step, len(self.script) - 1)
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.script[step]] = 0.0
        self.step += 1
        return forced

    def reset(self) -> Scripted:
        self.step = 0
        return self


def _generate(model, tok, script: list[int], **kwargs) -> list[int]:
    ids = tok("hello", return_tensors="pt")
    out = model.generate(**ids, logits_processor=[Scripted(script).reset()], **kwargs)
    return out[0, ids["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("name", ["gemma2", "phi3", "llama3_bf16_untied"])
def test_generation_stops_where_stock_generate_stops(family_dir, name: str) -> None:
    path = family_dir(name)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    eot = tok.convert_tokens_to_ids(BY_NAME[name].end_of_turn)
    a, b, c = (tok.convert_tokens_to_ids(t) for t in tok.tokenize("abc def")[:3])
    script = [a, b, eot, c, a, b, c, a]
    g = GenerationConfig(max_new_tokens=len(script))
    stock = _generate(model, tok, script, max_new_tokens=len(script), do_sample=False)
    ours = _generate(model, tok, script, **generation_kwargs(g, tok, model))
    assert stock == [a, b, eot]  # the family's generation config stops at its end of turn
    assert ours == stock


def test_template_end_of_turn_stops_even_when_the_generation_config_lacks_it(family_dir) -> None:
    path = family_dir("qwen2")  # base-model style: generation config stops at EOS only
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert templates.end_of_turn_ids(tok) == [im_end]
    a, b = (tok.convert_tokens_to_ids(t) for t in tok.tokenize("abc def")[:2])
    kwargs = generation_kwargs(GenerationConfig(max_new_tokens=6), tok, model)
    assert _generate(model, tok, [a, im_end, b, b, b, b], **kwargs) == [a, im_end]


def test_named_templates_render_their_end_of_turn_and_default_ends_with_eos(family_dir) -> None:
    tok = AutoTokenizer.from_pretrained(family_dir("gpt2"))  # no template of its own
    assert not tok.chat_template
    assert templates.apply_default(tok) and tok.chat_template == templates.DEFAULT_TEMPLATE
    assert templates.end_of_turn_ids(tok) == [tok.eos_token_id]
    gemma = AutoTokenizer.from_pretrained(family_dir("gemma2"))
    text = gemma.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], tokenize=False
    )
    turns = "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nYo<end_of_turn>\n"
    assert text == "<bos>" + turns
    assert templates.end_of_turn_ids(gemma) == [gemma.convert_tokens_to_ids("<end_of_turn>")]


def test_template_value_is_a_name_a_jinja_string_or_a_file(tmp_path: Path) -> None:
    from fasttrack.core.config_loader import load_config

    jinja = tmp_path / "mine.jinja"
    jinja.write_text("{{ messages[0]['content'] }}")
    assert templates.resolve("phi3") == templates.BUILTIN["phi3"]
    assert templates.resolve(str(jinja)) == "{{ messages[0]['content'] }}"
    assert templates.resolve("{{ x }}") == "{{ x }}"
    d = tiny_config_dict(tmp_path / "s", model={"chat_template": "vicuna"})
    with pytest.raises(ConfigError, match=r"model\.chat_template: .*'vicuna' is not a template"):
        load_config(write_config(tmp_path / "c.yaml", d))


def test_document_bos_only_where_the_tokenizer_adds_one(family_dir) -> None:
    from fasttrack.lib.models import CHAT_TEMPLATE, build_tokenizer
    from fasttrack.lib.perplexity import token_stream
    from tasks.pack import tokenize_texts

    gemma = AutoTokenizer.from_pretrained(family_dir("gemma2"))
    texts = ["first document", "second one"]
    docs = list(tokenize_texts(texts, gemma, family_dir("gemma2")))
    assert [d[0] for d in docs] == [gemma.bos_token_id] * 2
    assert token_stream(texts, gemma, None)[0].tolist().count(gemma.bos_token_id) == 2
    for name in ("gpt2", "qwen2"):
        tok = AutoTokenizer.from_pretrained(family_dir(name))
        assert templates.document_bos(tok) is None
    scratch = build_tokenizer(corpus()[:10], 300, 1, CHAT_TEMPLATE)  # has a BOS, never adds it
    assert scratch.bos_token_id is not None and templates.document_bos(scratch) is None


def test_plain_lora_targets_gpt2_conv1d(family_dir) -> None:
    from peft import get_peft_model

    from fasttrack.lib.adapters import lora_config

    model = AutoModelForCausalLM.from_pretrained(family_dir("gpt2"))
    config = lora_config(LoraConfig(target_modules=["c_attn"]), model)  # was "no Linear module"
    peft_model = get_peft_model(model, config)
    adapted = [n for n, _ in peft_model.named_parameters() if "lora_A" in n]
    assert len(adapted) == 2 and all("c_attn" in n for n in adapted)


def test_checkpoints_are_cast_to_the_base_dtype_or_model_dtype(family_dir, tmp_path) -> None:
    from safetensors import safe_open

    from fasttrack.core.config_loader import load_config
    from fasttrack.lib.models import cast_checkpoint, save_dtype, weights_dtype

    bf16 = AutoModelForCausalLM.from_pretrained(family_dir("llama3_bf16_untied")).config
    assert weights_dtype(bf16) == torch.bfloat16
    cfg = load_config(write_config(tmp_path / "a.yaml", tiny_config_dict(tmp_path / "s")))
    assert save_dtype(cfg, bf16) == torch.bfloat16
    d = tiny_config_dict(tmp_path / "s", model={"dtype": "fp16"})
    assert save_dtype(load_config(write_config(tmp_path / "b.yaml", d)), bf16) == torch.float16
    model = AutoModelForCausalLM.from_pretrained(family_dir("gpt2"))
    model.save_pretrained(tmp_path / "m")
    cast_checkpoint(tmp_path / "m", torch.bfloat16)
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    assert dtypes == {"BF16"}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert reloaded.dtype == torch.bfloat16
