"""CPU cores per worker when the policy and the generation engines run side by side on a CPU machine.

With `generation.colocated: false` each side has devices of its own. On a GPU cluster those are GPUs; on a CPU
machine they are cores, and two sides that compute at the same time (the asynchronous loop) must not share them:
torch's OpenMP threads slow down many times over when another process competes for their cores (docs/platform.md).
So each node's cores are split in equal shares, one per device: the policy's ranks take the first
`cluster.devices_per_node` shares, the engines the next `cluster.generation_devices_per_node` (an engine of
`generation.vllm.tensor_parallel` bundles gets its bundles' shares together).

A worker binds *every* thread of its process (Linux's sched_setaffinity binds one thread) before its libraries
start their thread pools, and sets torch's thread count to its share; threads and processes it starts later
inherit the binding. vLLM's CPU worker then takes its cores from the engine actor's own affinity
(VLLM_CPU_OMP_THREADS_BIND, models/generation/vllm_generation.py build_engine_environment).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

logger = logging.getLogger(__name__)

CORES_ENV = "CIPO_CPU_CORES"  # the cores a worker binds itself to, "0,1" (set by its worker group)


def split_node_cores(
    cores: Sequence[int], *, policy_devices: int, generation_devices: int, engine_tensor_parallel: int = 1
) -> tuple[list[list[int]], list[list[int]]]:
    """(the policy's cores per local rank, the generation group's cores per local rank) on one node; an engine's
    first bundle gets the cores of its whole TP group (its TP workers run there), a TP peer keeps its own share."""
    devices = policy_devices + generation_devices
    share = len(cores) // devices
    if share < 1:
        raise ValueError(f"{len(cores)} CPU core(s) cannot give each of the {policy_devices} policy and "
                         f"{generation_devices} generation devices per node (cluster.devices_per_node, "
                         "cluster.generation_devices_per_node) a core of its own")
    shares = [list(cores[device * share:(device + 1) * share]) for device in range(devices)]
    policy, generation = shares[:policy_devices], shares[policy_devices:]
    engines = [sum(generation[first:first + engine_tensor_parallel], [])
               for first in range(0, generation_devices, engine_tensor_parallel)]
    for engine, first in enumerate(range(0, generation_devices, engine_tensor_parallel)):
        generation[first] = engines[engine]
    return policy, generation


def format_cores(cores: Sequence[int]) -> str:
    return ",".join(str(core) for core in cores)


def parse_cores(text: str) -> list[int]:
    return [int(core) for core in text.split(",") if core.strip()]


def bind_process_to_cores(cores: Sequence[int]) -> None:
    """Every thread of this process, and what it starts later, runs on `cores`; torch uses that many threads."""
    wanted = set(cores)
    for thread in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(thread), wanted)
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
    os.environ["OMP_NUM_THREADS"] = str(len(wanted))
    # Set torch's count itself, importing it after the affinity so its pool inherits the binding: the environment
    # variable alone is read only where OpenMP has not started yet, and a reused Ray worker may have started it.
    import torch

    torch.set_num_threads(len(wanted))
    logger.info("process %d bound to CPU cores %s", os.getpid(), format_cores(sorted(wanted)))


def bind_from_environment() -> None:
    """Bind to the cores named in CIPO_CPU_CORES, if any (a worker group sets it per rank)."""
    cores = os.environ.get(CORES_ENV)
    if cores:
        bind_process_to_cores(parse_cores(cores))
