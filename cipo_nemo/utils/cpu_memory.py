"""How CPU worker processes allocate memory: huge pages, and freed memory kept for reuse.

A training step frees and re-allocates the same activation and gradient sizes every step. With glibc's defaults a
tensor above 32 MB is mmap'ed and handed back to the OS when freed, and the heap top is trimmed, so the next step
touches fresh pages again; every first touch is a page fault that zeroes the page. On this project's CPU machine (a
VM) a 4 KiB fault cost ~20 us: the Megatron worker's train stage spent 6-9 s of system time in steps 1-2 of the
step-speed benchmark and 0.3-1.2 s per step later, and the first refit's export 3-5 s (docs/notes/cpu_memory.md).

Two settings remove that, both read only when a process starts:
- PyTorch's `THP_MEM_ALLOC_ENABLE=1` (c10's CPU allocator, pytorch#93888): CPU buffers of 2 MiB and more are
  2 MiB aligned and `madvise`d for transparent huge pages, so one fault maps 2 MiB (when THP is `madvise` or
  `always`).
- glibc's `GLIBC_TUNABLES` `glibc.malloc.mmap_max=0` (every allocation from the heap) and a trim threshold no step
  reaches: freed memory stays with the process and the next step reuses it without faulting.
The price: each process keeps its peak memory until it exits. Worker processes on GPUs do their heavy allocation on
the GPU, so this applies only where no GPU is used.
"""

from __future__ import annotations

import os

GLIBC_KEEP_FREED_MEMORY = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"  # 64 GiB: never reached


def cpu_memory_environment(enabled: bool, *, on_gpu: bool, inherited: dict[str, str] | None = None) -> dict[str, str]:
    """The environment variables a CPU worker process starts with for huge pages and kept memory ({} when off or
    on GPU). Tunables the user already set in GLIBC_TUNABLES come last, so theirs win."""
    if not enabled or on_gpu:
        return {}
    inherited = os.environ if inherited is None else inherited
    tunables = ":".join(part for part in (GLIBC_KEEP_FREED_MEMORY, inherited.get("GLIBC_TUNABLES", "")) if part)
    return {"THP_MEM_ALLOC_ENABLE": "1", "GLIBC_TUNABLES": tunables}
