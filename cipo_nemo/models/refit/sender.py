"""The policy side of the bucket transports (ipc, broadcast), mixed into every policy worker.

A policy supplies `_refit_stream()`: its HF-named tensors as an iterator that every rank runs (Megatron's gather
through megatron-bridge is collective; the HF policy has one rank). Policy rank r feeds the engine worker on its own
device over IPC; with broadcast, rank 0 sends and the other ranks only take part in the gather.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from cipo_nemo.models.refit import broadcast
from cipo_nemo.models.refit.transfer import send_weights


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class BucketSender:
    def _refit_stream(self) -> Iterator[tuple[str, torch.Tensor]]:
        raise NotImplementedError

    def send_weights(self, message: dict) -> dict | None:
        """Stream the weights by the refit's `message` (transfer.BucketTransport); returns the transfer's
        statistics on a rank that sent. Collective on a distributed policy; the device's cached blocks (the
        buckets, the gathered tensors) are returned before the engine's KV cache wakes."""
        try:
            stats = send_weights(self._refit_stream(), message, rank=_rank())
            if dist.is_initialized():
                dist.barrier()  # every rank's engine worker has loaded when any rank returns
            return stats
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def open_refit_group(self, name: str, world_size: int, timeout_s: float) -> tuple[str, int] | None:
        """Rank 0 (the broadcast's sender): start the refit group's store; (host, port) for the engine workers."""
        if _rank() != broadcast.SENDER:
            return None
        return broadcast.open_store(name, world_size=world_size, timeout_s=timeout_s)

    def join_refit_group(self, group: dict) -> None:
        if _rank() == broadcast.SENDER:
            broadcast.join_group(broadcast.BroadcastGroup(**group), rank=broadcast.SENDER)
