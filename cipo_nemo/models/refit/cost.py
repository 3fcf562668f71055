"""What one refit costs (every step): the HF-weight file each node writes, its host-memory transient, an
estimated time, and whether this machine's /dev/shm and host memory hold it. The dry run prints it (plan.py).

Refit path (models/refit/transfer.py refit_weights): each node's first policy rank gathers the HF-named weights one tensor
at a time and streams each into one file in /dev/shm (the other ranks copy nothing to host memory), and the node's
vLLM engines load it (models/refit/shm_file.py).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from cipo_nemo.models.shapes import ModelShape

GIB = 2**30
# Assumed rates for the refit time (GB/s; not measured on a GPU: this project's CI has none). The writer rank copies
# each gathered tensor device -> pageable host memory and writes its bytes into /dev/shm from one thread (measured on
# the 2-core CPU machine: 3.3 GB/s, docs/notes/refit.md), and every engine rank reads its shard of the memory-mapped
# file onto its GPU.
REFIT_DEVICE_TO_HOST_GBPS = 10.0
REFIT_WRITE_GBPS = 2.0
REFIT_LOAD_GBPS = 10.0
SHARED_MEMORY = Path("/dev/shm")


@dataclass(frozen=True)
class RefitEstimate:
    """One refit (every step): each node's first policy rank writes the HF-named weights to one file in /dev/shm
    that the node's vLLM engines load (models/refit/transfer.py refit_weights)."""

    file_bytes: int  # the whole model in the policy's dtype (a tied output layer is not written)
    writers: int  # one per node
    engine_tensor_parallel: int
    on_gpu: bool
    shm_free_bytes: int | None  # this machine's /dev/shm; None without one (the temp dir is used)
    host_total_bytes: int | None  # this machine's MemTotal; None where /proc/meminfo is absent
    checked_here: bool  # this machine runs the workers (a CPU run, or a GPU run started on a GPU node)

    @property
    def host_transient_bytes(self) -> int:
        """A writer's node: the file itself (tmpfs is memory), kept from one refit to the next (RefitStaging reuses
        its pages). The writer streams each gathered tensor into it, so it never holds a second host copy of the
        model (only one tensor at a time)."""
        return self.file_bytes

    @property
    def seconds(self) -> dict[str, float]:
        """Estimated time per stage at the assumed REFIT_*_GBPS rates."""
        gigabytes = self.file_bytes / 1e9
        stages = {"device->host": gigabytes / REFIT_DEVICE_TO_HOST_GBPS} if self.on_gpu else {}
        stages["write"] = gigabytes / REFIT_WRITE_GBPS
        stages["engine reload"] = gigabytes / self.engine_tensor_parallel / REFIT_LOAD_GBPS  # one shard per rank
        return stages


def estimate_refit_cost(shape: ModelShape, *, precision: str, num_nodes: int, engine_tensor_parallel: int,
                        on_gpu: bool) -> RefitEstimate:
    """The refit of `shape` trained in `precision` (bf16 | fp32) on `num_nodes` nodes."""
    dtype_bytes = 2 if precision == "bf16" else 4
    return RefitEstimate(
        file_bytes=shape.total_params() * dtype_bytes,
        writers=num_nodes,
        engine_tensor_parallel=engine_tensor_parallel,
        on_gpu=on_gpu,
        shm_free_bytes=_shared_memory_free(),
        host_total_bytes=_host_memory_total(),
        checked_here=not on_gpu or _has_cuda(),
    )


def _shared_memory_free() -> int | None:
    return shutil.disk_usage(SHARED_MEMORY).free if SHARED_MEMORY.is_dir() else None


def _host_memory_total() -> int | None:
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024  # kB
    return None


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def check_refit_host(refit: RefitEstimate) -> list[str]:
    """On a machine that runs the workers: the refit file must fit /dev/shm (the loop writes it there whenever
    /dev/shm exists: a container's default 64 MiB fails mid-write), and host memory must hold it."""
    if not refit.checked_here:
        return []
    problems = []
    if refit.shm_free_bytes is not None and refit.shm_free_bytes < refit.file_bytes:
        problems.append(
            f"the refit file ({refit.file_bytes / GIB:.1f} GiB of HF weights, written every step) does not fit "
            f"/dev/shm on this machine ({refit.shm_free_bytes / GIB:.2f} GiB free); give the containers a larger "
            "/dev/shm (docker --shm-size, or a host /dev/shm mount)")
    if refit.host_total_bytes is not None and refit.host_total_bytes < refit.host_transient_bytes:
        problems.append(
            f"host memory ({refit.host_total_bytes / GIB:.1f} GiB) is smaller than the refit's file on a "
            f"writing node ({refit.host_transient_bytes / GIB:.1f} GiB: the weights file in "
            "/dev/shm)")
    return problems
