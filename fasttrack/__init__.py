"""LLM FastTrack's library: `core` (config, store, stage runner, isolation) and `lib` (what the
stages share). Progress is reported by our own callback and Prefect, so the libraries' tqdm
bars (which garble logs and the Prefect UI) are off unless the user asks."""

import os

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers + hub bars
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's reference log-prob bars
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings from datasets.map


def _drop_offline_kernel_hint() -> None:
    """bitsandbytes on an AVX512-BF16 CPU tries to fetch an optional 4-bit GEMM kernel from the
    Hub (`kernels-community`) and warns on every process when it cannot: offline it never can,
    and the stock kernel it falls back to is the one every figure here was measured with."""
    import logging

    def keep(record: logging.LogRecord) -> bool:
        return "from kernels-community" not in str(record.msg)

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(keep)


_drop_offline_kernel_hint()
