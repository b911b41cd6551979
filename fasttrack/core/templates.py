"""Chat templates and the tokens a model family starts and stops with.

`model.chat_template` takes a built-in name (the families' own formats, as axolotl and
LLaMA-Factory users know them), a Jinja string, or a path to a `.jinja` file; `resolve` turns it
into Jinja text at config time, so the key holds the template itself, never a name that could
change meaning. A base model without any template gets `DEFAULT_TEMPLATE`: ChatML whose turns end
with the tokenizer's own EOS, so the end of an answer is a token the model already knows (no
new token, no embedding resize) and the one generation stops at.

Templates render with `trim_blocks` (transformers 5): newlines are emitted as `{{ '\\n' }}`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Each ends a turn with the family's end-of-turn token; `bos_token`/`eos_token` come from the
# tokenizer at render time, so one template serves every tokenizer of its family.
BUILTIN: dict[str, str] = {
    "chatml": (
        "{%- for m in messages -%}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{%- for m in messages -%}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] "
        "+ '<|eot_id|>' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}"
    ),
    "gemma": (
        "{{ bos_token }}"
        "{%- for m in messages -%}"
        "{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}"
        "{{ '<start_of_turn>' + role + '\n' + m['content'] + '<end_of_turn>' + '\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
    ),
    "phi3": (
        "{%- for m in messages -%}"
        "{{ '<|' + m['role'] + '|>' + '\n' + m['content'] + '<|end|>' + '\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
    ),
    "mistral": (
        "{{ bos_token }}"
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'assistant' -%}{{ ' ' + m['content'] + eos_token }}"
        "{%- else -%}{{ '[INST] ' + m['content'] + ' [/INST]' }}{%- endif -%}"
        "{%- endfor -%}"
    ),
    "alpaca": (
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'assistant' -%}{{ m['content'] + eos_token + '\n\n' }}"
        "{%- elif m['role'] == 'system' -%}{{ m['content'] + '\n\n' }}"
        "{%- else -%}{{ '### Instruction:\n' + m['content'] + '\n\n### Response:\n' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
}
# The default for a base model with no template: ChatML, each turn closed by the tokenizer's EOS.
DEFAULT_NAME = "chatml-eos"
DEFAULT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + eos_token + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)
_MARKER = "\x1fFASTTRACK\x1f"


def template_file(value: str | None, base_dir: Path | None = None) -> Path | None:
    """The file a `model.chat_template` value names (relative: against `base_dir`, the config
    file's folder, else the working directory), or None for a name or a Jinja string."""
    if value is None or value in BUILTIN or "{{" in value or "{%" in value:
        return None
    path = Path(value).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path if path.suffix == ".jinja" or path.is_file() else None


def resolve(value: str | None, base_dir: Path | None = None) -> str | None:
    """Jinja text of `model.chat_template`: a built-in name, a `.jinja` path (relative paths
    against `base_dir`, else the working directory) or a Jinja string. ValueError otherwise."""
    if value is None:
        return None
    if value in BUILTIN:
        return BUILTIN[value]
    if "{{" in value or "{%" in value:
        return value
    path = template_file(value, base_dir)
    if path is not None:
        try:
            return path.read_text(encoding="utf-8")
        except OSError as exc:
            relative = base_dir and not Path(value).expanduser().is_absolute()
            rel = f" (relative to {base_dir})" if relative else ""
            raise ValueError(f"cannot read template file {value}{rel}: {exc.strerror}") from None
    raise ValueError(
        f"{value!r} is not a template name ({', '.join(BUILTIN)}), a Jinja string or a .jinja file"
    )


def apply_default(tok: Any) -> bool:
    """Give a tokenizer without a chat template the documented default; True if it did."""
    if getattr(tok, "chat_template", None):
        return False
    tok.chat_template = DEFAULT_TEMPLATE
    return True


def end_of_turn_ids(tok: Any) -> list[int]:
    """The token(s) the chat template closes an assistant turn with: the first token after
    the answer when it is a special (added) token, e.g. `<end_of_turn>`, `<|im_end|>`, EOS."""
    if not getattr(tok, "chat_template", None):
        return []
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _MARKER}]
    try:
        text = tok.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that needs other roles or fields: no extra stop token
        return []
    if _MARKER not in text:
        return []
    after = text.rsplit(_MARKER, 1)[1]
    ids = tok(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}))
    return [ids[0]] if ids and ids[0] in special else []


def stop_ids(tok: Any, model: Any = None) -> list[int]:
    """Every id generation must stop at: the tokenizer's EOS, the model's generation-config
    EOS id(s) (a list on Gemma, Phi-3, Llama 3) and the template's end-of-turn token."""
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    configured = getattr(gen, "eos_token_id", None)
    for i in [tok.eos_token_id, *_as_list(configured), *end_of_turn_ids(tok)]:
        if i is not None and i not in ids:
            ids.append(int(i))
    return ids


def document_bos(tok: Any) -> int | None:
    """The BOS id when the tokenizer itself starts every text with it (Gemma, Llama, Mistral:
    their pretraining saw it), else None (GPT-2, Qwen, NeoX, the scratch tokenizer)."""
    bos = getattr(tok, "bos_token_id", None)
    if bos is None:
        return None
    with_special = tok("a", add_special_tokens=True)["input_ids"]
    return bos if with_special and with_special[0] == bos else None


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]
