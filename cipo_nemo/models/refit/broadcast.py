"""Refit transport for engines on other devices: buckets broadcast from one policy rank over a process group.

One group joins the sending policy rank (group rank 0; megatron-bridge gives every rank the full gathered tensors,
so global rank 0 sends) and every engine worker (group rank 1 + the worker's cluster rank), made once when the run
starts (as NeMo-RL and verl do) with its own store, outside both sides' default groups: NCCL on GPUs, gloo on CPU,
where it stands in for NCCL in the tests. Every refit then sends the HF tensors packed into buckets (buckets.py), per
bucket three broadcasts: a header (kind, payload bytes, index bytes), the pickled index (names, dtypes, shapes,
offsets) and the payload. The sender reuses one buffer (a broadcast has finished reading it when it returns); each
engine worker receives into its own buffers and reuses one only when its engine no longer reads it (BufferGuard),
adding a buffer when all of them are still read. NCCL cannot join two processes of one GPU, so a colocated engine
uses the IPC transport (ipc.py) instead (the config refuses broadcast there).
"""

from __future__ import annotations

import datetime
import pickle
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from cipo_nemo.models.refit.buckets import BufferGuard, PackedTensor, hand_out, pack_buckets
from cipo_nemo.models.refit.ipc import TransferStats, allocate_buffer, measured_buffer_bytes
from cipo_nemo.models.refit.manifest import WeightSyncError

SENDER = 0
_BUCKET, _ALONE, _END = 0, 1, 2
_GROUPS: dict[tuple[str, int], object] = {}  # (group name, rank): this process's members, made once
_STORES: dict[str, object] = {}


@dataclass(frozen=True)
class BroadcastGroup:
    """Where the refit group meets and how it moves buckets (plain fields: it crosses collective_rpc as a dict)."""

    name: str
    host: str
    port: int
    world_size: int  # 1 sender + every engine worker
    backend: str  # nccl | gloo
    bucket_bytes: int
    timeout_s: float

    @property
    def timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.timeout_s)


def reachable_host() -> str:
    """This node's address for the group's store: Ray's view of the node when Ray runs here, else loopback."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"


def open_store(name: str, *, world_size: int, timeout_s: float) -> tuple[str, int]:
    """On the sender: start the group's store on a free port; returns (host, port) for the engine workers."""
    host = reachable_host()
    store = dist.TCPStore(host, 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout_s))
    _STORES[name] = store
    return host, store.port


def join_group(group: BroadcastGroup, rank: int) -> None:
    """Make this process's member of the group (every member calls it at the same time; blocks until all have).
    The sender uses the store it opened; the others connect to it."""
    if (group.name, rank) in _GROUPS:
        raise RuntimeError(f"refit group {group.name!r} already has rank {rank} in this process")
    store = _STORES.get(group.name) if rank == SENDER else None
    if store is None:
        store = dist.TCPStore(group.host, group.port, group.world_size, is_master=False, timeout=group.timeout)
    prefixed = dist.PrefixStore(f"cipo-refit/{group.name}", store)
    if group.backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = group.timeout
        process_group = dist.ProcessGroupNCCL(prefixed, rank, group.world_size, options)
    else:
        process_group = dist.ProcessGroupGloo(prefixed, rank, group.world_size, group.timeout)
    _GROUPS[group.name, rank] = process_group
    hello = torch.tensor([rank], device=_device(group))
    process_group.broadcast(hello, SENDER).wait()  # every member is up (NCCL makes its communicator here)


def leave_group(name: str) -> None:
    for key in [key for key in _GROUPS if key[0] == name]:
        del _GROUPS[key]
    _STORES.pop(name, None)


def _device(group: BroadcastGroup) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if group.backend == "nccl" else torch.device("cpu")


def _broadcast(group: BroadcastGroup, rank: int, tensor: torch.Tensor) -> None:
    try:
        _GROUPS[group.name, rank].broadcast(tensor, SENDER).wait()
    except KeyError:
        raise WeightSyncError(f"refit group {group.name!r} has no rank {rank} in this process") from None
    except RuntimeError as exc:  # gloo / NCCL: a peer died or timed out
        raise WeightSyncError(f"refit broadcast failed: {str(exc).splitlines()[0]}") from exc


# ----------------------------------------------------------------------------------------------- sender


def send_over_broadcast(named_tensors: Iterable[tuple[str, torch.Tensor]], group: BroadcastGroup) -> dict:
    """Broadcast `named_tensors` to every engine worker of the group; returns the sender's statistics."""
    started = time.perf_counter()
    device = _device(group)
    stats = TransferStats()
    buffer: list[torch.Tensor] = []
    baseline = measured_buffer_bytes(device)

    def acquire(tensor_device: torch.device) -> tuple[int, torch.Tensor]:
        if not buffer:
            buffer.append(allocate_buffer(group.bucket_bytes, device))
            stats.slots = 1
        return 0, buffer[0]

    def standalone(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device).contiguous().reshape(-1).view(torch.uint8)

    for bucket in pack_buckets(((name, t.to(device)) for name, t in named_tensors), bucket_bytes=group.bucket_bytes,
                               acquire_slot=acquire, standalone=standalone):
        kind = _ALONE if bucket.slot is None else _BUCKET
        _send_message(group, kind, bucket.tensors, bucket.buffer[: bucket.nbytes])
        held = group.bucket_bytes * len(buffer) + (bucket.nbytes if kind == _ALONE else 0)
        stats.peak_buffer_bytes = max(stats.peak_buffer_bytes, held)
        stats.peak_measured_bytes = max(stats.peak_measured_bytes, measured_buffer_bytes(device) - baseline)
        stats.buckets += kind == _BUCKET
        stats.alone += kind == _ALONE
        stats.tensors += len(bucket.tensors)
        stats.bytes += bucket.nbytes
    _send_message(group, _END, (), None)
    stats.seconds = time.perf_counter() - started
    return {"sender": stats.as_dict()}


def _send_message(group: BroadcastGroup, kind: int, tensors: tuple[PackedTensor, ...],
                  payload: torch.Tensor | None) -> None:
    device = _device(group)
    index = pickle.dumps(tensors)
    nbytes = 0 if payload is None else payload.numel()
    _broadcast(group, SENDER, torch.tensor([kind, nbytes, len(index)], dtype=torch.int64, device=device))
    if kind == _END:
        return
    _broadcast(group, SENDER, torch.frombuffer(bytearray(index), dtype=torch.uint8).to(device))
    _broadcast(group, SENDER, payload)


# ----------------------------------------------------------------------------------------------- engine side


@dataclass
class BroadcastReceiver:
    """An engine worker's side of one refit: `buckets()` gives the broadcast tensors as views, bucket by bucket."""

    group: BroadcastGroup
    rank: int
    check_name: Callable[[str], None] | None = None  # raises WeightSyncError for a name the engine lacks
    stats: TransferStats = field(default_factory=TransferStats)

    def __post_init__(self) -> None:
        self._started = time.perf_counter()
        self._device = _device(self.group)
        self._guard = BufferGuard()
        self._slots: list[torch.Tensor] = []
        self._baseline = measured_buffer_bytes(self._device)
        self._alone = 0

    def buckets(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Each broadcast bucket's tensors as (name, view) pairs, one list per bucket (buckets.hand_out); a buffer is
        received into again once nothing references it."""
        while True:
            self._release_unused()
            header = torch.empty(3, dtype=torch.int64, device=self._device)
            _broadcast(self.group, self.rank, header)
            kind, nbytes, index_bytes = header.tolist()
            if kind == _END:
                return
            index = torch.empty(index_bytes, dtype=torch.uint8, device=self._device)
            _broadcast(self.group, self.rank, index)
            entries: tuple[PackedTensor, ...] = pickle.loads(index.cpu().numpy().tobytes())
            key, buffer = self._receiving_buffer(kind, nbytes)
            _broadcast(self.group, self.rank, buffer[:nbytes])
            self._guard.hold(key, buffer)
            del buffer
            self._account(entries, kind)
            yield from hand_out(self._guard.buffers[key], entries, self.check_name)

    def _receiving_buffer(self, kind: int, nbytes: int) -> tuple[tuple, torch.Tensor]:
        """A buffer nothing reads any more: a free slot (a new one when all are read), or one sized for a tensor
        sent alone."""
        if kind == _ALONE:
            self._alone += 1
            return ("alone", self._alone), allocate_buffer(nbytes, self._device)
        for slot, buffer in enumerate(self._slots):
            if ("slot", slot) not in self._guard.buffers:
                return ("slot", slot), buffer
        self._slots.append(allocate_buffer(self.group.bucket_bytes, self._device))
        self.stats.slots = len(self._slots)
        return ("slot", len(self._slots) - 1), self._slots[-1]

    def _release_unused(self) -> None:
        free = self._guard.free_keys()
        if free and self._device.type == "cuda":
            torch.cuda.current_stream(self._device).synchronize()
        for key in free:
            self._guard.drop(key)

    def _account(self, entries: tuple[PackedTensor, ...], kind: int) -> None:
        self.stats.buckets += kind == _BUCKET
        self.stats.alone += kind == _ALONE
        self.stats.tensors += len(entries)
        self.stats.bytes += sum(entry.nbytes for entry in entries)
        held = sum(buffer.numel() for key, buffer in self._guard.buffers.items() if key[0] == "alone")
        held += len(self._slots) * self.group.bucket_bytes
        self.stats.peak_buffer_bytes = max(self.stats.peak_buffer_bytes, held)
        measured = measured_buffer_bytes(self._device) - self._baseline
        self.stats.peak_measured_bytes = max(self.stats.peak_measured_bytes, measured)

    def finish(self) -> dict:
        self.stats.seconds = time.perf_counter() - self._started
        self._guard.clear()
        self._slots.clear()
        return self.stats.as_dict()

    def abort(self) -> None:
        self._guard.clear()
        self._slots.clear()
