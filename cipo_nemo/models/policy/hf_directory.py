"""Write a Hugging Face model directory from HF-named weights gathered out of a Megatron model.

What `save_pretrained` writes: config, generation config and tokenizer (the source checkpoint's artifacts, through
megatron-bridge), and safetensors shards with an index when sharded. Shared by the policy's `save_hf` (the live
model, any layout) and `cipo-nemo export` (a checkpoint loaded on one process).

Not megatron-bridge's `save_hf_pretrained`: its weight writer imports nvidia-modelopt unconditionally
(auto_bridge.py:1127, save_hf_weights), which is not part of either install profile.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def write_hf_directory(path: Path, weights: dict[str, torch.Tensor], *, bridge: Any, tokenizer: str | None) -> None:
    """Config and tokenizer of the bridge's source checkpoint (or of `tokenizer`, the policy's tokenizer
    directory, when set), then the weights; `path` is created if needed."""
    bridge.hf_pretrained.save_artifacts(path)
    if tokenizer is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(str(path))
    write_safetensors(weights, path)


def write_safetensors(weights: dict[str, torch.Tensor], path: Path) -> None:
    """Shards (+ index when sharded) as `save_pretrained` lays them out."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    plan = split_torch_state_dict_into_shards(weights)
    for filename, names in plan.filename_to_tensors.items():
        save_file({name: weights[name].contiguous() for name in names}, path / filename, metadata={"format": "pt"})
    if plan.is_sharded:
        index = {"metadata": plan.metadata, "weight_map": plan.tensor_to_filename}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
