"""`torch = lazy("torch")`: a module imported on first attribute access, not at import time.

Why: a fully cached run (and `fasttrack ask --server`, `ls`, `plan`...) needs the stage modules for
their keys but none of torch/transformers (~5 s of imports on 2 cores). Modules that use a heavy
library only inside functions bind it through this proxy instead of a top-level import, so
importing the flow or the CLI loads none of them.

The proxy is a plain object in the importing module's namespace (never in `sys.modules`), so other
libraries are unaffected, and the real import runs under Python's import lock (thread-safe, unlike
`importlib.util.LazyLoader` on 3.11).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar

T = TypeVar("T")


class LazyModule:
    __slots__ = ("_name", "_module")

    def __init__(self, name: str):
        self._name, self._module = name, None

    def _load(self) -> ModuleType:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return self._module

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._load(), attr)

    def __repr__(self) -> str:
        state = "loaded" if self._module is not None else "not loaded yet"
        return f"<lazy module {self._name!r} ({state})>"


def lazy(name: str) -> Any:
    """A stand-in for `import name` that imports on first use (typed Any: use it as the module)."""
    return LazyModule(name)


def inference_mode(fn: Callable[..., T]) -> Callable[..., T]:
    """`@torch.inference_mode()` without importing torch when the decorated module loads."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        import torch

        with torch.inference_mode():
            return fn(*args, **kwargs)

    return wrapper
