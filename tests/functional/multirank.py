"""Run a function on N ranks of a gloo world (torch.multiprocessing spawn), for multi-rank CPU tests.

    results = run_on_ranks(check_fn, world_size=2, args=(model_dir,))

`check_fn(rank, world_size, *args)` must be importable by name (a module-level function of a test module or
package). Each rank gets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (a free port) and an initialized gloo
process group. Returns the per-rank return values (torch.save-able) in rank order, or raises with the failing
rank's traceback.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_on_ranks(
    fn: Callable[..., Any], *, world_size: int, args: Sequence[Any] = (), threads_per_rank: int | None = None
) -> list[Any]:
    """`fn(rank, world_size, *args)` on `world_size` spawned ranks; their return values in rank order."""
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
    with tempfile.TemporaryDirectory(prefix="multirank_") as result_dir:
        # join=True raises ProcessRaisedException carrying the failing rank's traceback
        mp.spawn(
            _rank_entry,
            args=(world_size, free_port(), threads, result_dir, fn, tuple(args)),
            nprocs=world_size,
            join=True,
        )
        return [torch.load(Path(result_dir) / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def _rank_entry(
    rank: int,
    world_size: int,
    port: int,
    threads: int,
    result_dir: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(result_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
