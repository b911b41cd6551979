"""Training child start latency: from `run_isolated(...)` to the moment the build function has
torch, transformers, peft and TRL imported (what every training stage's build needs first).

    python -m benchmarks.child_start [--reps 3]     # from the repository root

- fresh: a new interpreter per child (FASTTRACK_FORKSERVER=0, the behaviour before the zygote);
- forked: `os.fork()` of the preloaded zygote (fasttrack/core/forkserver.py), zygote warm;
- zygote_start: the one-time cost of starting the zygote (paid by the first training stage).
Alternated per repetition; the load average is recorded (the machine may be shared).
Writes benchmarks/results/child_start.json. Goal: forked <= 2 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def ready_at() -> float:
    """Run in the child: the imports a training build starts with, then the clock."""
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    return time.time()


def once(fork: bool) -> float:
    from benchmarks.child_start import ready_at as fn  # by module name: the child imports it
    from fasttrack.core.isolation import run_isolated

    os.environ["FASTTRACK_FORKSERVER"] = "1" if fork else "0"
    started = time.time()
    return round(run_isolated(fn, stage="bench") - started, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    from fasttrack.core.forkserver import Zygote

    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    out: dict = {"machine": machine, "load_avg_before": os.getloadavg()}
    t0 = time.time()
    Zygote.get()
    out["zygote_start_s"] = round(time.time() - t0, 2)
    fresh, forked = [], []
    for _ in range(args.reps):
        fresh.append(once(fork=False))
        forked.append(once(fork=True))
    out |= {
        "fresh_s": fresh,
        "forked_s": forked,
        "fresh_median_s": statistics.median(fresh),
        "forked_median_s": statistics.median(forked),
        "speedup": round(statistics.median(fresh) / statistics.median(forked), 1),
        "load_avg_after": os.getloadavg(),
        "goal": "forked <= 2 s to a child with torch/transformers/peft/trl imported",
    }
    text = json.dumps(out, indent=2)
    print(text)
    (ROOT / "benchmarks" / "results" / "child_start.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
