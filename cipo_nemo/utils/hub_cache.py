"""Where the Hugging Face hub cache is and whether downloading is allowed: one answer for models
(cipo_nemo/models/hub.py) and datasets (cipo_nemo/data/hub_datasets.py). Both read huggingface_hub's own
constants at call time, so HF_HUB_CACHE / HF_HOME / HF_HUB_OFFLINE mean what they mean to `hf download`."""

from __future__ import annotations

from pathlib import Path


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE=1: nothing may be downloaded."""
    from huggingface_hub import constants

    return constants.is_offline_mode()
