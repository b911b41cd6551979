"""The memory `fasttrack plan` checks a run against when no `--gpu-mem` is given: the first
CUDA device's memory, else the machine's RAM (a CPU run trains in system memory)."""

from __future__ import annotations

import os


def detect_memory() -> tuple[int, str]:
    """(bytes, description) of the device a run here would train on."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory, f"CUDA {props.name}, {props.total_memory / 2**30:.1f} GiB"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total, f"CPU, system RAM {total / 2**30:.1f} GiB (no CUDA device)"
