"""Where the Hugging Face hub cache is and whether downloading is allowed: one answer for models
(cipo_nemo/models/hub.py) and datasets (cipo_nemo/data/hub_datasets.py). Both read huggingface_hub's own
constants at call time, so HF_HUB_CACHE / HF_HOME / HF_HUB_OFFLINE mean what they mean to `hf download`; and the
one download of either."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE=1: nothing may be downloaded."""
    from huggingface_hub import constants

    return constants.is_offline_mode()


class DownloadFailed(OSError):
    """A hub download that failed; the message is one line, '<error type>: <its first line>'."""


def download_once(repo_id: str, revision: str | None, *, repo_type: str,
                  download: Callable[..., str] | None = None) -> Path:
    """`huggingface_hub.snapshot_download` (or the `download` a caller injects, with the same contract) of a model or
    dataset repository into the hub cache; returns the snapshot directory."""
    if download is None:
        from huggingface_hub import snapshot_download as download
    from huggingface_hub.errors import HfHubHTTPError

    at = f" at revision {revision!r}" if revision else ""
    logger.info("downloading %s %s%s into %s (once; later runs find it in the cache)", repo_type, repo_id, at,
                hub_cache_dir())
    kind = {} if repo_type == "model" else {"repo_type": repo_type}  # the library's default is a model
    try:
        return Path(download(repo_id, revision=revision, **kind))
    except (HfHubHTTPError, OSError, ValueError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DownloadFailed(f"{type(error).__name__}: {first_line}") from None
