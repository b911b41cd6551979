"""What `fasttrack ask` prints, local or from a server: kept apart from fasttrack/lib/ask.py so
`ask --server` (an HTTP client) imports neither the config schema nor generation code, most of
its start-up on 2 cores (benchmarks/ask_latency.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Answer:
    text: str
    hits: list[Any]
    mode: str
    model_stage: str
    model_key: str
    notes: list[str]  # why newer models of the run were not used
    in_prompt: int | None = None  # how many of `hits` (the best) fit the model's context
