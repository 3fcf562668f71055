"""The optimizer's state in host memory while a colocated engine generates, and back on the device to train.

`policy.offload_optimizer_for_generation` (the dry run decides `auto`, cipo_nemo/plan.py): the trainer moves the
optimizer's state out after each training stage, before the engine wakes for the refit, and back before the next
optimizer step (trainer.optimizer_state_for_training), as NeMo-RL does for colocated vLLM. The engine's share of the
GPU then holds what the optimizer held (12.7 GiB per GPU for the 70B preset).

What moves: every tensor of the optimizer's per-parameter state (Adam's moments; a fused Adam's step) and the fp32
main weights the optimizer updates, where those are copies (bf16 training). A tensor sharing storage with the model's
own parameters stays: an fp32 model without the distributed optimizer hands the optimizer its very parameters, and
the distributed optimizer's fp32 shards are views of the DDP parameter buffer. megatron-core 0.19.2's own
`MegatronOptimizer.offload_to_cpu` (optimizer/optimizer.py:555-575) moves every param-group tensor, so there it would
move the model's weights out from under the logprob pass and the refit; hence the selection by storage here.

Each moved tensor returns to the device it came from. A parameter keeps its identity (its `.data` is replaced), so
torch's optimizer state, keyed by the parameter object, still finds it. Checkpoints need no restore: megatron's
distributed optimizer reads its state with `.cpu()` when saving (distrib_optimizer.py:1354) and copies into the
existing tensors when loading (:1215-1225); the trainer restores around a load all the same (the engine sleeps
then). On a CPU-only machine everything already is in host memory: both calls move nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

HOST = torch.device("cpu")


@dataclass(frozen=True)
class TensorSlot:
    """Where one optimizer tensor is held: a parameter's `.data` (key None) or an entry of a state dict."""

    holder: Any
    key: str | None = None

    def get(self) -> torch.Tensor:
        return self.holder.data if self.key is None else self.holder[self.key]

    def put(self, tensor: torch.Tensor) -> None:
        if self.key is None:
            self.holder.data = tensor
        else:
            self.holder[self.key] = tensor


def torch_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a megatron optimizer (chained or not), or a torch optimizer itself."""
    return [getattr(member, "optimizer", member) for member in getattr(optimizer, "chained_optimizers", [optimizer])]


def _storage(tensor: torch.Tensor) -> tuple[torch.device, int]:
    return tensor.device, tensor.untyped_storage().data_ptr()


def optimizer_owned_tensors(optimizers: Iterable[torch.optim.Optimizer],
                            model_parameters: Iterable[torch.Tensor]) -> Iterator[TensorSlot]:
    """Every tensor the optimizers hold that is not (a view of) a model parameter's storage."""
    model_storages = {_storage(parameter) for parameter in model_parameters}
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                if _storage(parameter) not in model_storages:
                    yield TensorSlot(parameter)
        for state in optimizer.state.values():
            for key, value in state.items():
                if torch.is_tensor(value) and _storage(value) not in model_storages:
                    yield TensorSlot(state, key)


@dataclass
class OptimizerOffload:
    """The moves out (`offload`) and back (`restore`) of one policy's optimizer-owned tensors."""

    host: torch.device = HOST
    moved: list[tuple[TensorSlot, torch.device]] = field(default_factory=list)  # each slot and where it came from

    def offload(self, optimizers: list[torch.optim.Optimizer], model_parameters: list[torch.Tensor]) -> int:
        """Move every owned tensor not yet on the host there; returns the bytes moved. Twice is harmless."""
        moved_bytes = 0
        for slot in optimizer_owned_tensors(optimizers, model_parameters):
            tensor = slot.get()
            if tensor.device != self.host:
                self.moved.append((slot, tensor.device))
                slot.put(tensor.to(self.host))
                moved_bytes += tensor.numel() * tensor.element_size()
        return moved_bytes

    def restore(self) -> int:
        """Put every offloaded tensor back on its device; returns the bytes moved."""
        moved_bytes = 0
        for slot, device in self.moved:
            tensor = slot.get()
            slot.put(tensor.to(device))
            moved_bytes += tensor.numel() * tensor.element_size()
        self.moved.clear()
        return moved_bytes


class OffloadsOptimizerState:
    """`offload_optimizer` / `restore_optimizer` for a policy that holds `_optimizer` (torch or megatron) and
    `_named_parameters()` (its model's)."""

    _optimizer: Any
    _optimizer_offload: OptimizerOffload | None = None

    def _named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        raise NotImplementedError

    def offload_optimizer(self) -> int:
        """The optimizer's state into host memory (a colocated engine is about to wake); bytes moved."""
        if self._optimizer_offload is None:
            self._optimizer_offload = OptimizerOffload()
        moved = self._optimizer_offload.offload(torch_optimizers(self._optimizer),
                                                [parameter for _, parameter in self._named_parameters()])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the engine is another process: cached blocks are no use to it
        return moved

    def restore_optimizer(self) -> int:
        """The optimizer's state back where it was, for the next optimizer step; bytes moved."""
        return 0 if self._optimizer_offload is None else self._optimizer_offload.restore()
