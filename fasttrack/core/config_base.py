"""The base of every config section (strict: unknown keys are errors) and deprecation lines."""

from __future__ import annotations

import warnings

from pydantic import BaseModel, ConfigDict


def deprecated(line: str) -> None:
    """One `FutureWarning` line on stderr (Python shows each once per process and place)."""
    warnings.warn(f"config: {line}", FutureWarning, stacklevel=3)


class Section(BaseModel):
    """Base of every section: unknown keys are errors; values are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)
