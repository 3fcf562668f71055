"""The policy side of every refit transport, mixed into both policies (the Megatron worker on each rank, the HF
policy in the driver).

A policy supplies `_refit_stream()`: its HF-named tensors as an iterator that every rank runs (Megatron's gather
through megatron-bridge is collective and gives every rank the full tensors; the HF policy has one rank). With the
file, each node's first rank streams them into its staging file and the other ranks only take part in the gather;
with ipc, policy rank r feeds the engine worker on its own device; with broadcast, rank 0 sends. Every export ends by
returning the device's cached blocks (the gathered tensors, the buckets), so that a colocated engine can wake into
that memory, as NeMo-RL's workers do.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from cipo_nemo.models.refit import broadcast
from cipo_nemo.models.refit.profile import RefitProfile
from cipo_nemo.models.refit.shm_file import RefitStaging
from cipo_nemo.models.refit.transfer import send_weights


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def first_rank_on_node() -> bool:
    """LOCAL_RANK 0 (set by worker groups, torchrun and Slurm wrappers); global rank 0 when it is not set."""
    return int(os.environ.get("LOCAL_RANK", _rank())) == 0


def _return_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class RefitSender:
    _refit_staging: RefitStaging | None = None  # the file transport's staging file, made on first use

    def _refit_stream(self) -> Iterator[tuple[str, torch.Tensor]]:
        raise NotImplementedError

    # ----- file --------------------------------------------------------------------------------

    def export_hf_weights_to(self, path: str | Path) -> int:
        """Write the HF-named weights to `path` (the raw refit format of shm_file.py) on the first rank of every
        node (each node's engines read their own node's copy, e.g. in /dev/shm); returns the tensor count on those
        ranks, 0 elsewhere. Collective; every node's file is complete when any rank returns. Each gathered tensor is
        written as it comes (its own bytes only, even when it is a view into DDP's buffer), so the writer holds no
        second host copy of the model."""
        writer = first_rank_on_node()
        profile = RefitProfile("policy_export")
        count = 0
        try:
            gathered = profile.timed_iteration("gather", self._refit_stream())
            with profile.stage("gather_and_write"):  # write = gather_and_write - gather
                if writer:
                    path = Path(path)
                    path.parent.mkdir(parents=True, exist_ok=True)  # on other nodes the driver's directory is absent
                    self._refit_staging = self._refit_staging or RefitStaging()
                    count = self._refit_staging.write(path, gathered)
                else:
                    for _ in gathered:  # the gather is collective: take part, copy nothing to host memory
                        pass
            with profile.stage("barrier"):
                if dist.is_initialized():
                    dist.barrier()
        finally:
            _return_cached_memory()
        if writer:
            profile.write()
        return count

    def remove_exported_weights(self, path: str | Path) -> None:
        """Delete this node's copy written by export_hf_weights_to (and its directory, when empty)."""
        if first_rank_on_node():
            path = Path(path)
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                path.parent.rmdir()

    def close_refit(self) -> None:
        """Remove the staging file (the policy's shutdown)."""
        if self._refit_staging is not None:
            self._refit_staging.close()

    # ----- ipc, broadcast ----------------------------------------------------------------------

    def send_weights(self, message: dict) -> dict | None:
        """Stream the weights by the refit's `message` (transfer.BucketTransport); returns the transfer's
        statistics on a rank that sent. Collective on a distributed policy."""
        try:
            stats = send_weights(self._refit_stream(), message, rank=_rank())
            if dist.is_initialized():
                dist.barrier()  # every rank's engine worker has loaded when any rank returns
            return stats
        finally:
            _return_cached_memory()

    def open_refit_group(self, name: str, world_size: int, timeout_s: float) -> tuple[str, int] | None:
        """Rank 0 (the broadcast's sender): start the refit group's store; (host, port) for the engine workers."""
        if _rank() != broadcast.SENDER:
            return None
        return broadcast.open_store(name, world_size=world_size, timeout_s=timeout_s)

    def join_refit_group(self, group: dict) -> None:
        if _rank() == broadcast.SENDER:
            broadcast.join_group(broadcast.BroadcastGroup(**group), rank=broadcast.SENDER)
