"""Which refit transport a placement gets, and the bucket rule, without torch (the dry run reads both).

Packing rule (`plan_buckets`; buckets.pack_buckets packs by it), in the policy's export order:
- a tensor goes into the current bucket at the next `BUCKET_ALIGNMENT`-aligned offset when it fits what is left;
  otherwise the bucket is sent and the tensor starts the next one in a free slot (a reusable buffer of
  `refit.bucket_mb`);
- a tensor larger than a whole bucket is never split: it is sent alone, as its own storage. vLLM's loaders take
  whole HF tensors and cut their tensor-parallel shard themselves, so a split tensor would need a reassembly buffer
  of its full size on the receiving side anyway.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the GPU check imports the transports where pydantic may be absent
    from cipo_nemo.config.schema import RefitConfig

BUCKET_ALIGNMENT = 256  # bytes; every tensor starts at a multiple, so a view of any dtype is aligned (as CUDA's allocator)
MIB = 2**20
SLOTS = 2  # bucket buffers per sender: the engine reads one while the policy fills the other


def resolve_transport(refit: RefitConfig, *, on_gpu: bool, colocated: bool, vllm: bool = True) -> str:
    """`refit.transport`, with auto resolved from the placement (the HF generation backend takes the file only)."""
    if refit.transport != "auto":
        return refit.transport
    if not on_gpu or not vllm:
        return "file"
    return "ipc" if colocated else "broadcast"


def aligned(offset: int) -> int:
    return -(-offset // BUCKET_ALIGNMENT) * BUCKET_ALIGNMENT


def plan_buckets(sizes: Iterable[tuple[str, int]], bucket_bytes: int) -> list[list[str]]:
    """The packing rule on (name, nbytes) alone: the names of each message, in order (a list of one name for a
    tensor sent alone). `pack_buckets` follows the same rule; the dry run counts buckets with it."""
    messages: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, nbytes in sizes:
        if nbytes > bucket_bytes:
            if current:
                messages.append(current)
            messages.append([name])
            current, used = [], 0
            continue
        start = aligned(used)
        if current and start + nbytes > bucket_bytes:
            messages.append(current)
            current, start = [], 0
        current.append(name)
        used = start + nbytes
    if current:
        messages.append(current)
    return messages
