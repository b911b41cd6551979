"""LLM FastTrack's library: `core` (config, store, stage runner, isolation) and `lib` (what the
stages share). Progress is reported by our own callback and Prefect, so the libraries' tqdm
bars (which garble logs and the Prefect UI) are off unless the user asks."""

import os

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers + hub bars
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's reference log-prob bars
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings from datasets.map
