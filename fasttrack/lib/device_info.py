"""The memory `fasttrack plan` checks a run against when no `--gpu-mem` is given: the first
CUDA device's memory, else the machine's RAM (a CPU run trains in system memory)."""

from __future__ import annotations

import os
import re

from fasttrack.core.errors import FastTrackError


def detect_memory() -> tuple[int, str]:
    """(bytes, description) of the device a run here would train on."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory, f"CUDA {props.name}, {props.total_memory / 2**30:.1f} GiB"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total, f"CPU, system RAM {total / 2**30:.1f} GiB (no CUDA device)"


def parse_size(text: str) -> int:
    """Bytes in "24GiB", "24GB", "80G", "512MiB", "1.5TiB". KiB/MiB/GiB/TiB are powers of 2,
    KB/MB/GB/TB powers of 10, and a bare K/M/G/T means the binary unit, as GPU memory is quoted
    ("80G" is an 80 GiB card). A bare number (or B) is bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)\s*", text, re.IGNORECASE)
    if not m or (m[3] and not m[2]):
        raise ValueError(f"not a memory size: {text!r} (e.g. 24GiB, 24GB, 80G, 512MiB)")
    number, prefix, binary, byte = m.groups()
    base = 1000 if byte and not binary else 1024
    size = int(float(number) * base ** ("kmgt".index(prefix.lower()) + 1 if prefix else 0))
    if size <= 0:
        raise ValueError(f"not a memory size: {text!r} (must be positive)")
    return size


def hardware() -> dict[str, str | int]:
    """The processor (and GPU) that produced a number, for the manifest: float results can
    differ between CPU models and GPU architectures even with the same seed and libraries."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    out: dict[str, str | int] = {"cpu": cpu, "cpu_count": os.cpu_count() or 0,
                                 "torch_threads": torch.get_num_threads()}  # fmt: skip
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["cuda"] = str(torch.version.cuda)
    return out


class EngineError(FastTrackError):
    """The requested serving engine cannot run on this machine."""


def check_vllm() -> None:
    """Raise EngineError (one line, before anything loads) unless vllm and CUDA are there."""
    import importlib.util

    missing = []
    if importlib.util.find_spec("vllm") is None:  # then say so at once, without loading torch
        missing.append("the vllm package is not installed (pip install vllm)")
    else:
        import torch

        if not torch.cuda.is_available():
            missing.append("no CUDA device is visible")
    if missing:
        raise EngineError(
            f"serve --engine vllm: {'; '.join(missing)}; serve with --engine transformers"
        )
