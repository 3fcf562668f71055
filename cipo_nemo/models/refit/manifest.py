"""Which engine parameters a refit must reach, checked name by name, and the error when it would not.

The policy exports Hugging Face-named tensors; a generation engine stores some of them fused (vLLM's `qkv_proj`
holds `q_proj`, `k_proj` and `v_proj`; `gate_up_proj` holds `gate_proj` and `up_proj`) and, for tied-embedding
models, has no separate output layer. A `WeightManifest` maps every engine parameter to the HF names it is loaded
from, so a refit can be checked name by name *before* the engine is touched (a missing tensor raises and names the
engine parameter it would have left stale) and counted afterwards (the number of engine parameters updated).

Quantized engines (`generation.vllm.quantization: fp8`): vLLM's online FP8 replaces each linear `weight` by an FP8
copy and registers a `weight_scale` beside it. A refit sends checkpoint-format (bf16, HF-named) tensors, and vLLM's
layerwise reload restores every layer to checkpoint format, loads them and re-quantizes, recomputing the scales.
So the manifest lists checkpoint-format parameters only: a scale has no HF tensor (megatron-bridge exports none).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

TIED_OUTPUT_WEIGHT = "lm_head.weight"
# Parameters a quantization method derives from a layer's checkpoint weight (or from calibration), named as vLLM's
# quantization methods register them; a checkpoint-format reload recomputes them.
QUANTIZATION_STATE_PARAMETERS = frozenset({
    "weight_scale", "weight_scale_inv", "weight_scale_2", "weight_global_scale", "weight_zero_point",
    "input_scale", "input_scale_inv", "input_global_scale", "input_zero_point",
    "q_scale", "k_scale", "v_scale", "prob_scale",
})


class WeightSyncError(RuntimeError):
    """A refit would leave (or left) engine parameters stale, or carried names the engine does not have."""


@dataclass(frozen=True)
class WeightManifest:
    """Engine parameter name -> the HF tensor names it is loaded from (one name, or the shards of a fused one)."""

    sources: Mapping[str, tuple[str, ...]]
    ignored: frozenset[str]  # HF names accepted but not loaded (the tied output layer)

    @property
    def num_parameters(self) -> int:
        return len(self.sources)

    def expected_names(self) -> set[str]:
        return {name for names in self.sources.values() for name in names}

    def check_names(self, names: Iterable[str]) -> None:
        """Raise `WeightSyncError` unless `names` covers every engine parameter and holds nothing unknown."""
        names = set(names)
        expected = self.expected_names()
        missing = sorted(expected - names)
        unexpected = sorted(names - expected - self.ignored)
        problems = []
        if missing:
            stale = sorted(param for param, srcs in self.sources.items() if not set(srcs) <= names)
            problems.append(
                f"missing {len(missing)} tensor(s) {missing}, which would leave engine parameter(s) {stale} stale"
            )
        if unexpected:
            problems.append(f"{len(unexpected)} tensor(s) the engine has no parameter for: {unexpected}")
        if problems:
            raise WeightSyncError("refit rejected before loading: " + "; ".join(problems))

    def stale_parameters(self, loaded_names: Iterable[str]) -> list[str]:
        """Engine parameters not fully covered by `loaded_names` (every shard of a fused parameter is needed)."""
        loaded = set(loaded_names)
        return sorted(param for param, srcs in self.sources.items() if not set(srcs) <= loaded)


def checkpoint_format_names(parameter_names: Iterable[str], *, quantized: bool) -> list[str]:
    """The engine parameters a checkpoint-format reload loads: without quantization all of them; with it, all but
    the quantization state (scales, zero points) the quantization method recomputes from the loaded weights."""
    if not quantized:
        return list(parameter_names)
    return [name for name in parameter_names if name.rpartition(".")[2] not in QUANTIZATION_STATE_PARAMETERS]


def build_weight_manifest(
    *,
    parameter_names: Iterable[str],
    packed_modules: Mapping[str, list[str]],
    tie_word_embeddings: bool,
    quantized: bool = False,
) -> WeightManifest:
    """Map engine parameter names (checkpoint format, see `checkpoint_format_names`) to HF names.

    `packed_modules` is the engine model's `packed_modules_mapping` (fused module -> its HF modules); a parameter
    whose dotted path contains a fused module name is loaded from one HF tensor per shard. With tied embeddings
    the engine's output layer *is* the embedding parameter (deduplicated from `named_parameters`), so an
    incoming `lm_head.weight` is accepted and ignored, as the HF and vLLM loaders do.
    """
    sources: dict[str, tuple[str, ...]] = {}
    for name in checkpoint_format_names(parameter_names, quantized=quantized):
        parts = name.split(".")
        fused_at = next((i for i, part in enumerate(parts) if part in packed_modules), None)
        if fused_at is None:
            sources[name] = (name,)
            continue
        shards = packed_modules[parts[fused_at]]
        sources[name] = tuple(".".join([*parts[:fused_at], shard, *parts[fused_at + 1 :]]) for shard in shards)
    tied_extra = {TIED_OUTPUT_WEIGHT} if tie_word_embeddings and TIED_OUTPUT_WEIGHT not in sources else set()
    return WeightManifest(sources=sources, ignored=frozenset(tied_extra))


def detach_for_transfer(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy that owns exactly its own storage.

    Exported weights can be views into a whole DDP / optimizer buffer; pickling or `torch.save` of a view writes
    the entire underlying storage (it reached 18 GB for a 0.5 GB model, docs/platform.md), so always copy.
    """
    return tensor.detach().to(device="cpu", copy=True, memory_format=torch.contiguous_format)
