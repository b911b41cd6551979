"""Request fields -> decoding settings, and request-body limits, of the serve API."""

from __future__ import annotations

import pytest

from fasttrack.core.config_eval import GenerationConfig
from fasttrack.lib.serve_api import ApiError, ChatBody, decoding, parse


def body(**fields) -> ChatBody:
    return ChatBody(model="m", messages=[{"role": "user", "content": "hi"}], **fields)


@pytest.mark.parametrize(
    ("base", "fields", "strategy", "temperature", "top_p"),
    [
        ("greedy", {}, "greedy", 0.7, 0.95),  # nothing given: the config's decoding
        ("sample", {}, "sample", 0.7, 0.95),
        ("sample", {"temperature": 0}, "greedy", 0.7, 0.95),  # OpenAI's "deterministic"
        ("greedy", {"temperature": 1.3}, "sample", 1.3, 0.95),
        ("greedy", {"top_p": 0.5}, "sample", 0.7, 0.5),
        ("beam", {}, "beam", 0.7, 0.95),
    ],
)
def test_request_fields_map_onto_the_configured_decoding(
    base: str, fields: dict, strategy: str, temperature: float, top_p: float
) -> None:
    g = decoding(GenerationConfig(strategy=base, repetition_penalty=1.3), body(**fields), 7)
    assert (g.strategy, g.temperature, g.top_p, g.max_new_tokens) == (
        strategy, temperature, top_p, 7,
    )  # fmt: skip
    assert g.repetition_penalty == 1.3  # not an OpenAI field: always the config's


@pytest.mark.parametrize(
    ("data", "param"),
    [
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
         "max_tokens"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3},
         "temperature"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ],
)  # fmt: skip
def test_invalid_fields_are_422_naming_the_field(data: dict, param: str) -> None:
    with pytest.raises(ApiError) as e:
        parse(ChatBody, data)
    assert e.value.status == 422 and e.value.param == param
