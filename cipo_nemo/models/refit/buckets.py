"""Fixed-size buckets of HF-named tensors: the unit the IPC and broadcast transports move (device-agnostic).

Packing (`pack_buckets`) follows the rule of layout.py: tensors in export order at aligned offsets of a slot (a
reusable buffer of `refit.bucket_mb`), a new bucket when the next tensor does not fit, and a tensor larger than a
bucket sent alone as its own storage (a gathered tensor that owns exactly its bytes is shared as it is; a view is
copied first).

Receiving side: every tensor is a view into the bucket, never a copy. A bucket's buffer may be reused (overwritten
by the sender, or by the next broadcast) only once nothing on the receiving side still references it: vLLM's
layerwise reload keeps the tensors of a layer it has not completed (vllm 0.32
model_executor/model_loader/reload/layerwise.py `online_process_loader` buffers `bound_args`), e.g. q/k/v when v
comes in the next bucket, and a layer with padding rows (a padded vocabulary) until the end. vLLM's own packed-IPC
consumer clones every tensor for that reason (distributed/weight_transfer/packed_tensor.py:450-456); here the views
stay views and `BufferGuard` measures the references instead: a buffer counts as free when the number of tensors
using its storage is back to what it was when the buffer arrived (torch's storage use count). The engine loads one
bucket per `load_weights` call, so no reference outlives a call but the layers' own (one streaming call kept stale
ones alive: vLLM's `WeightsMapper.apply` generator holds the last fused shard it renamed until the next one).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from cipo_nemo.models.refit.layout import aligned


@dataclass(frozen=True)
class PackedTensor:
    """Where one HF tensor lies in a bucket's buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Bucket:
    """One message of a transfer: a slot's buffer filled with `tensors`, or (slot None) one tensor sent alone."""

    slot: int | None
    buffer: torch.Tensor  # uint8, on the sender's device
    tensors: tuple[PackedTensor, ...]

    @property
    def nbytes(self) -> int:
        last = self.tensors[-1]
        return last.offset + last.nbytes


def tensor_nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def pack_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    bucket_bytes: int,
    acquire_slot: Callable[[torch.device], tuple[int, torch.Tensor]],
    standalone: Callable[[torch.Tensor], torch.Tensor],
) -> Iterator[Bucket]:
    """Pack tensors into slot buffers by the rule of layout.py, yielding each bucket when it is full.

    `acquire_slot(device)` returns a free (slot index, uint8 buffer of `bucket_bytes`) and may block until the
    receiving side releases one; it is called only after the previous bucket was yielded (and sent).
    `standalone(tensor)` returns what a tensor larger than a bucket is sent as (its own storage, shareable).
    """
    slot, buffer, packed, used = None, None, [], 0
    for name, tensor in named_tensors:
        tensor = tensor.detach()
        nbytes = tensor_nbytes(tensor)
        if nbytes > bucket_bytes:
            if packed:
                yield Bucket(slot, buffer, tuple(packed))
                slot, buffer, packed, used = None, None, [], 0
            own = standalone(tensor)
            yield Bucket(None, own, (PackedTensor(name, _dtype_name(tensor), tuple(tensor.shape), 0, nbytes),))
            continue
        start = aligned(used)
        if packed and start + nbytes > bucket_bytes:
            yield Bucket(slot, buffer, tuple(packed))
            slot, buffer, packed, start = None, None, [], 0
        if buffer is None:
            slot, buffer = acquire_slot(tensor.device)
        tensor_view(buffer, start, tensor.dtype, tensor.shape).copy_(tensor)  # device to device, any strides
        packed.append(PackedTensor(name, _dtype_name(tensor), tuple(tensor.shape), start, nbytes))
        used = start + nbytes
    if packed:
        yield Bucket(slot, buffer, tuple(packed))


def tensor_view(buffer: torch.Tensor, offset: int, dtype: torch.dtype, shape: Iterable[int]) -> torch.Tensor:
    """A view of `buffer` (uint8) as a tensor of `dtype` and `shape` starting at byte `offset`."""
    shape = tuple(shape)
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    return buffer[offset: offset + nbytes].view(dtype).view(shape)


def unpacked(buffer: torch.Tensor, entry: PackedTensor) -> torch.Tensor:
    return tensor_view(buffer, entry.offset, getattr(torch, entry.dtype), entry.shape)


def hand_out(buffer: torch.Tensor, entries: Iterable[PackedTensor], check_name: Callable[[str], None] | None
             ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """One bucket's tensors as one list of (name, view), after `check_name` passed them all. The list is emptied
    when the caller asks for the next bucket, so that the caller's own reference to it holds no view: what still
    references the buffer then is what the engine keeps (an incomplete layer)."""
    entries = list(entries)
    for entry in entries:
        if check_name is not None:
            check_name(entry.name)
    items = [(entry.name, unpacked(buffer, entry)) for entry in entries]
    yield items
    items.clear()


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------------- receiving side


def storage_users(tensor: torch.Tensor) -> int:
    """How many tensors use `tensor`'s storage (torch's StorageImpl use count; used by torch's own CUDA graph trees
    to tell a freed storage). Only compared with itself: its value for a lone tensor differs between torch builds."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


@dataclass
class BufferGuard:
    """The receiving side's buffers and whether anything still reads them."""

    buffers: dict[object, torch.Tensor] = field(default_factory=dict)
    baselines: dict[object, int] = field(default_factory=dict)

    def hold(self, key: object, buffer: torch.Tensor) -> None:
        """Start guarding `buffer` (taken before any view of it is handed out)."""
        self.buffers[key] = buffer
        self.baselines[key] = storage_users(buffer)

    def in_use(self, key: object) -> bool:
        return storage_users(self.buffers[key]) > self.baselines[key]

    def free_keys(self) -> list[object]:
        return [key for key in self.buffers if not self.in_use(key)]

    def drop(self, key: object) -> None:
        del self.buffers[key], self.baselines[key]

    def clear(self) -> None:
        self.buffers.clear()
        self.baselines.clear()


# ----------------------------------------------------------------------------------------------- measurement


_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s+(/dev/shm/\S+)")


def shared_memory_mapped_bytes(pid: int | str = "self", *, prefix: str = "/dev/shm/torch_") -> int:
    """Bytes of shared memory this process maps from torch's shared-memory segments (what CPU buckets are made
    of: `share_memory_()` segments, whose names are unlinked at once and show as "(deleted)"). Read from
    /proc/<pid>/maps; 0 where there is no /proc."""
    path = f"/proc/{pid}/maps"
    if not os.path.exists(path):
        return 0
    total = 0
    with open(path) as maps:
        for line in maps:
            match = _MAPPING.match(line)
            if match and match.group(3).startswith(prefix):
                total += int(match.group(2), 16) - int(match.group(1), 16)
    return total
