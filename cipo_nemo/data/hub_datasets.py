"""Datasets by hub id (`data.*.kind: hf`, the named benchmarks of cipo_nemo/eval/registry.py): where they are, the
one download, and reading a split through `datasets.load_dataset`.

A dataset is handled as a model is (cipo_nemo/models/hub.py): a hub id is a dataset repository in the Hugging
Face hub cache (`snapshot_download(..., repo_type="dataset", local_files_only=True)` at the pinned revision); one
that is absent is downloaded there whole, once, by :func:`fetch_dataset`, which only the preflight and the eval
command call; with HF_HUB_OFFLINE=1 an absent id is one error naming the id and the cache. `hf download ID
--repo-type dataset` on a login node fills the same cache. The split is then read from that snapshot directory by
`datasets.load_dataset(directory, name, split=...)`, which resolves the repository's configs as the hub does
(README YAML `configs:` with data_files patterns, or the default layout: `data/train-*.parquet`, ...). A local
directory laid out like a dataset repository is read the same way, without the cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cipo_nemo.data.sources import DataError
from cipo_nemo.utils.hub_cache import DownloadFailed, download_once, hub_cache_dir, hub_offline


# huggingface_hub.snapshot_download's contract: (repo_id, repo_type=, revision=) -> the snapshot directory
DatasetDownloader = Callable[..., str]


def looks_like_a_directory(path: str) -> bool:
    """A hub id is exactly `owner/name`; anything else (absolute, relative, deeper) names a local directory."""
    return path.startswith(("/", ".", "~")) or path.count("/") != 1 or Path(path).expanduser().is_dir()


def _at(revision: str | None) -> str:
    return f" at revision {revision!r}" if revision else ""


def _download_command(repo_id: str, revision: str | None) -> str:
    return f"hf download {repo_id} --repo-type dataset" + (f" --revision {revision}" if revision else "")


def find_local_dataset_dir(path: str, revision: str | None, *, key: str) -> Path | None:
    """The dataset's directory if it is here (a local directory, or the hub id's snapshot in the cache); None for a
    hub id that is not. Never downloads. A directory that does not exist, or a revision with a directory, is an
    error."""
    if looks_like_a_directory(path):
        directory = Path(path).expanduser()
        if not directory.is_dir():
            raise DataError(f"{key}: directory {directory} does not exist (a hub id is owner/name)")
        if revision is not None:
            raise DataError(f"{key}: {directory} is a directory, but a revision ({revision!r}) pins a hub id only")
        return directory.resolve()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(path, repo_type="dataset", revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        return None


def resolve_dataset_dir(path: str, revision: str | None, *, key: str) -> Path:
    """The directory of a dataset that must be here already (after the preflight's fetch)."""
    directory = find_local_dataset_dir(path, revision, key=key)
    if directory is not None:
        return directory
    raise DataError(f"{key}: {path!r}{_at(revision)} is not in the Hugging Face cache {hub_cache_dir()}; the training "
                    f"preflight downloads hub datasets (or: {_download_command(path, revision)})")


def fetch_dataset(path: str, revision: str | None, *, key: str, download: DatasetDownloader | None = None) -> Path:
    """Make the dataset present on this node and return its directory: a hub id absent from the cache is downloaded
    now, once (`download` is huggingface_hub.snapshot_download unless a caller injects one); offline it is one
    DataError naming the id and the cache."""
    directory = find_local_dataset_dir(path, revision, key=key)
    if directory is not None:
        return directory
    if hub_offline():
        raise DataError(offline_absence(path, revision, key=key))
    try:
        return download_once(path, revision, repo_type="dataset", download=download)
    except DownloadFailed as error:
        raise DataError(f"{key}: downloading dataset {path!r}{_at(revision)} into {hub_cache_dir()} failed: "
                        f"{error}") from None


def offline_absence(path: str, revision: str | None, *, key: str) -> str:
    """The one line of a hub dataset that is not in the cache while HF_HUB_OFFLINE=1 forbids downloading it."""
    return (f"{key}: dataset {path!r}{_at(revision)} is not in the Hugging Face cache {hub_cache_dir()} and "
            f"HF_HUB_OFFLINE=1 forbids downloading it: download it into that cache first "
            f"({_download_command(path, revision)})")


@dataclass(frozen=True)
class DatasetPresence:
    """What the dry run says of a hub dataset: here (where), or absent and downloaded by the preflight."""

    key: str
    path: str
    revision: str | None
    directory: Path | None

    def line(self) -> str:
        what = f"{self.key} {self.path}{_at(self.revision)}"
        if self.directory is not None:
            return f"{what}: present in {self.directory}"
        return f"{what}: absent: will be downloaded in the preflight into {hub_cache_dir()} (its rows not checked now)"


def dataset_presence(path: str, revision: str | None, *, key: str) -> DatasetPresence:
    """Present or absent, never downloading; absent while offline is the DataError the real run would stop with."""
    directory = find_local_dataset_dir(path, revision, key=key)
    if directory is None and hub_offline():
        raise DataError(offline_absence(path, revision, key=key))
    return DatasetPresence(key=key, path=path, revision=revision, directory=directory)


def split_label(path: str, name: str | None, split: str) -> str:
    """How rows of a hub split are named in logs and item ids: `openai/gsm8k:main:test` (`[17]` is appended)."""
    return ":".join(part for part in (path, name, split) if part)


def load_split(directory: Path, *, name: str | None, split: str, label: str) -> Any:
    """One split of the dataset repository in `directory` as a `datasets.Dataset`; an unknown config or split is a
    DataError that lists the ones there are (the library's own message)."""
    import datasets

    try:
        with _progress_bars_off(datasets):
            return datasets.load_dataset(str(directory), name, split=split)
    except (ValueError, FileNotFoundError) as error:  # unknown config or split, no data files
        message = " ".join(str(error).split("Example of usage")[0].split())
        raise DataError(f"{label}: {message}") from None


@contextlib.contextmanager
def _progress_bars_off(datasets: Any) -> Iterator[None]:
    """The library's tqdm bars would write over the run's console; its log records go to run.log as any library's."""
    were_off = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        if not were_off:
            datasets.utils.enable_progress_bars()
