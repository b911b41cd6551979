"""Named points inside long stages where the fault tests stop a run (tests/e2e/test_faults.py).

Why: a kill after a fixed delay lands wherever the run happens to be, which under load was
always start-up, never the inside of `rag` or `evaluate`. `reached(point)` does nothing unless
the environment variable FASTTRACK_FAULT_POINT names that point (one lookup: the code path is
otherwise unchanged); then it writes `<FASTTRACK_FAULT_DIR>/<point>` and blocks, so a test can
SIGKILL the run exactly there.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "FASTTRACK_FAULT_POINT"
DIR_ENV = "FASTTRACK_FAULT_DIR"
BLOCK_S = 600.0  # a test kills well before; a forgotten variable fails instead of hanging


def marker(folder: Path, point: str) -> Path:
    return folder / point.replace(":", "-")


def reached(point: str) -> None:
    if os.environ.get(ENV) != point:
        return
    marker(Path(os.environ.get(DIR_ENV, ".")), point).write_text(str(os.getpid()))
    time.sleep(BLOCK_S)
    raise RuntimeError(f"{ENV}={point}: nobody stopped the run at this point")
