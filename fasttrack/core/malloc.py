"""glibc malloc settings for training processes (the zygote and every fresh training child).

Why: a training step allocates and frees the same large buffers every step (the logits and their
gradient: batch x sequence x vocabulary fp32, 32 MiB in the default config). glibc serves
requests above its mmap threshold (adaptive, capped at 32 MiB) with a fresh `mmap`, and hands a
free heap top above its trim threshold (128 KiB) back to the kernel, so each step faults the
same memory in again, page by page. Measured on the default config's SFT recipe, 150 steps on 2
quiet cores (`benchmarks/sft_ab.py --malloc`, 4 reps): 2.4-4.1 M minor page faults with glibc's
defaults, 0.37 M with both thresholds at 1 GiB, and 1.40x the training throughput.

Both thresholds are set: either one alone switches glibc's adaptive mmap threshold off, and the
trim threshold alone then maps *every* request above 128 KiB (twice as slow). Freed memory up to
1 GiB stays in the process for reuse, which a training process that exits when done can afford.
Tunables are read when a process starts, so this goes into the environment of the processes
`run_isolated` starts (forked children inherit the zygote's). A GLIBC_TUNABLES the user set is
left alone; FASTTRACK_MALLOC_TUNING=0 turns this off. Other C libraries ignore the variable.
"""

from __future__ import annotations

from collections.abc import Mapping

ENV = "FASTTRACK_MALLOC_TUNING"
LIMIT = 1 << 30  # bytes: requests below it come from the heap; a free top below it is kept
TUNABLES = f"glibc.malloc.mmap_threshold={LIMIT}:glibc.malloc.trim_threshold={LIMIT}"


def switched_on(env: Mapping[str, str], name: str) -> bool:
    """A FASTTRACK_* on/off switch: on unless set to 0, false, no or off (also the fork
    server's, which starts the processes this module tunes)."""
    return env.get(name, "1").strip().lower() not in ("0", "false", "no", "off")


def training_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` plus the malloc tunables, unless the user set GLIBC_TUNABLES or opted out."""
    out = dict(env)
    if switched_on(env, ENV) and "GLIBC_TUNABLES" not in out:
        out["GLIBC_TUNABLES"] = TUNABLES
    return out
