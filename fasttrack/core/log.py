"""One logger for library and stage code: Prefect's run logger inside a run, a plain one outside."""

from __future__ import annotations

import logging


def get_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a run (shows in the UI), a plain logger outside."""
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # MissingContextError outside a flow/task run
        return logging.getLogger("fasttrack")
