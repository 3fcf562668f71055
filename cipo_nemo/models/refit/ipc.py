"""Refit transport for an engine on the policy's own device: buckets shared through torch's tensor reductions.

Each policy rank packs its gathered HF tensors into reusable buckets (buckets.py) on its own device and hands the
engine worker on the same device a handle for each bucket buffer, made by
`torch.multiprocessing.reductions.reduce_tensor`: on a GPU a CUDA IPC handle (the engine maps the policy's memory;
nothing goes through the host), on CPU a shared-memory segment passed as a file descriptor. The engine loads from
views of the mapped buffer and releases it; the policy fills a released buffer with the next bucket. The first use
of a slot in a refit carries its handle, later buckets in the same slot only their index.

Channel: one Unix socket per policy rank in the abstract namespace (nothing on disk, so a killed process leaves no
socket file), authenticated with the refit's key (multiprocessing.connection's challenge); messages are pickled by
multiprocessing's pickler, which passes CPU storages as descriptors through multiprocessing's resource sharer
(authenticated with the *sender's* process key: the sender says it in its first message). The sender listens,
the engine connects. The policy's rank r feeds the engine worker on the same device, which the placement makes the
TP rank t of engine e with r = e x TP + t (ray_generation.EngineLayout).

Messages, sender -> engine: ("hello", sender process key), ("bucket", slot, handle or None, tensors, slots the
sender has), ("alone", key, handle, tensors) for a tensor larger than a bucket, ("end", tensor count).
Engine -> sender: ("release", slot), ("release_alone", key), ("starved",) when the engine holds every slot the
sender has and still needs the next bucket (a layer spanning more buckets than there are slots): the sender then
adds a slot, and the transfer's statistics say so; ("done", statistics) once the engine has finished its load.

A killed sender: the socket closes, the engine raises WeightSyncError at its next read and drops its mappings; CPU
segments were unlinked when they were made (torch's file_descriptor sharing), so no shared memory outlives the
processes that map it. A killed engine: the sender's next read raises.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

from cipo_nemo.models.refit.buckets import (
    BufferGuard,
    PackedTensor,
    hand_out,
    pack_buckets,
    shared_memory_mapped_bytes,
    tensor_nbytes,
)
from cipo_nemo.models.refit.layout import SLOTS
from cipo_nemo.models.refit.manifest import WeightSyncError

CONNECT_POLL_S = 0.05
ENGINE = "the engine worker"


@dataclass(frozen=True)
class IpcChannel:
    """One refit's channels: a fresh name and key per refit, so a late message of an old refit cannot be taken for a
    new one. Plain fields: it crosses vLLM's collective_rpc (msgpack) as a dict."""

    token: str
    authkey_hex: str
    bucket_bytes: int
    timeout_s: float

    @classmethod
    def create(cls, *, bucket_bytes: int, timeout_s: float) -> IpcChannel:
        return cls(token=secrets.token_hex(8), authkey_hex=secrets.token_hex(32), bucket_bytes=bucket_bytes,
                   timeout_s=timeout_s)

    @property
    def authkey(self) -> bytes:
        return bytes.fromhex(self.authkey_hex)

    def address(self, sender_rank: int) -> str:
        return f"\0cipo-refit-{self.token}-{sender_rank}"  # Linux abstract namespace: no file


@dataclass
class TransferStats:
    """What one side of one refit moved and held (the CPU figures are read from /proc; see buckets.py)."""

    tensors: int = 0
    bytes: int = 0
    buckets: int = 0
    alone: int = 0
    slots: int = 0  # buffers of bucket_bytes the sender allocated (SLOTS unless the engine starved)
    starved: int = 0
    peak_buffer_bytes: int = 0  # bucket buffers + tensors sent alone, held at once (by this side's accounting)
    peak_measured_bytes: int = 0  # the same, measured: CPU shared memory mapped, or CUDA memory allocated
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(vars(self))


def allocate_buffer(nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 buffer on `device`; on CPU in shared memory (what reduce_tensor shares, and what /proc shows)."""
    buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return buffer.share_memory_() if buffer.device.type == "cpu" else buffer


def measured_buffer_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return shared_memory_mapped_bytes()


def synchronize(device: torch.device) -> None:
    """Copies into (or reads from) a shared buffer are queued on the device's stream: finish them before the other
    process is told the buffer is ready (or free)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


# ----------------------------------------------------------------------------------------------- the connection


def _authenticated(sock: socket.socket, authkey: bytes, *, server: bool) -> Connection:
    connection = Connection(sock.detach())
    if server:  # as multiprocessing.connection.Listener.accept / Client do
        deliver_challenge(connection, authkey)
        answer_challenge(connection, authkey)
    else:
        answer_challenge(connection, authkey)
        deliver_challenge(connection, authkey)
    return connection


def accept_engine(channel: IpcChannel, sender_rank: int) -> Connection:
    """Listen on this rank's address and accept the engine worker (within the channel's timeout)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(channel.address(sender_rank))
        listener.listen(1)
        listener.settimeout(channel.timeout_s)
        try:
            sock, _ = listener.accept()
        except TimeoutError:
            raise WeightSyncError(f"refit: no engine worker connected to policy rank {sender_rank} within "
                                  f"{channel.timeout_s:g} s (refit.timeout_s)") from None
    sock.settimeout(None)
    return _authenticated(sock, channel.authkey, server=True)


def connect_to_sender(channel: IpcChannel, sender_rank: int) -> Connection:
    """Connect to the policy rank's address, retrying until it listens (it starts when its export starts)."""
    deadline = time.monotonic() + channel.timeout_s
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(channel.address(sender_rank))
            return _authenticated(sock, channel.authkey, server=False)
        except (ConnectionRefusedError, FileNotFoundError):
            sock.close()
            if time.monotonic() > deadline:
                raise WeightSyncError(f"refit: policy rank {sender_rank} did not open its channel within "
                                      f"{channel.timeout_s:g} s (refit.timeout_s)") from None
            time.sleep(CONNECT_POLL_S)


def _receive(connection: Connection, timeout_s: float, *, peer: str) -> tuple:
    try:
        if not connection.poll(timeout_s):
            raise WeightSyncError(f"refit: {peer} sent nothing for {timeout_s:g} s (refit.timeout_s)")
        return connection.recv()
    except (EOFError, ConnectionError, OSError) as exc:
        raise WeightSyncError(f"refit: {peer} closed the channel mid-transfer ({type(exc).__name__})") from exc


def _send(connection: Connection, message: tuple, *, peer: str) -> None:
    try:
        connection.send(message)
    except (ConnectionError, OSError) as exc:
        raise WeightSyncError(f"refit: {peer} closed the channel mid-transfer ({type(exc).__name__})") from exc


@contextlib.contextmanager
def _process_authkey(key: bytes) -> Iterator[None]:
    """multiprocessing's resource sharer, which hands over the CPU buffers' descriptors, authenticates with the
    current process key: while unpickling the sender's messages, use the sender's."""
    process = multiprocessing.current_process()
    saved = process.authkey
    process.authkey = key
    try:
        yield
    finally:
        process.authkey = saved


# ----------------------------------------------------------------------------------------------- sender


class _SenderSlots:
    """The sender's bucket buffers: which are free, the tensors sent alone it keeps alive, and its statistics."""

    def __init__(self, connection: Connection, channel: IpcChannel, stats: TransferStats) -> None:
        self._connection, self._channel, self._stats = connection, channel, stats
        self.buffers: list[torch.Tensor] = []
        self._free: list[int] = []
        self._handle_sent: set[int] = set()
        self._alone: dict[int, torch.Tensor] = {}
        self._next_alone = 0
        self._device: torch.device | None = None
        self._baseline = 0

    @property
    def limit(self) -> int:
        """Slots this sender fills before it waits for a release (more only when the engine starved)."""
        return max(SLOTS, len(self.buffers))

    def acquire(self, device: torch.device) -> tuple[int, torch.Tensor]:
        self._on(device)
        self.drain(block=False)
        while not self._free:
            if len(self.buffers) < SLOTS:
                self._add_slot()
            else:
                self.drain(block=True)
        slot = self._free.pop(0)
        self._measure()
        return slot, self.buffers[slot]

    def standalone(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor larger than a bucket, as a uint8 buffer of exactly its bytes that can be shared: a CUDA tensor
        that owns exactly its storage as it is (no copy), anything else copied once."""
        self._on(tensor.device)
        nbytes = tensor_nbytes(tensor)
        owns_its_storage = (tensor.is_contiguous() and tensor.storage_offset() == 0
                            and tensor.untyped_storage().nbytes() == nbytes)
        if tensor.device.type == "cuda" and owns_its_storage:
            return tensor.reshape(-1).view(torch.uint8)
        buffer = allocate_buffer(nbytes, tensor.device)
        buffer.view(tensor.dtype).view(tensor.shape).copy_(tensor)
        return buffer

    def handle_once(self, slot: int) -> tuple | None:
        if slot in self._handle_sent:
            return None
        self._handle_sent.add(slot)
        return reduce_tensor(self.buffers[slot])

    def keep_alone(self, buffer: torch.Tensor) -> int:
        key, self._next_alone = self._next_alone, self._next_alone + 1
        self._alone[key] = buffer
        self._measure()
        return key

    def drain(self, *, block: bool) -> None:
        """Take the engine's releases (blocking for one message when `block`)."""
        while block or self._connection.poll(0):
            message = _receive(self._connection, self._channel.timeout_s, peer=ENGINE)
            block = False
            match message:
                case ("release", slot):
                    self._free.append(slot)
                case ("release_alone", key):
                    self._alone.pop(key, None)
                case ("starved",):
                    self._stats.starved += 1
                    self._add_slot()
                case _:
                    raise WeightSyncError(f"refit: unexpected message from the engine worker: {message[0]!r}")

    def _on(self, device: torch.device) -> None:
        if self._device is None:
            self._device, self._baseline = device, measured_buffer_bytes(device)

    def _add_slot(self) -> None:
        self.buffers.append(allocate_buffer(self._channel.bucket_bytes, self._device))
        self._free.append(len(self.buffers) - 1)
        self._stats.slots = len(self.buffers)
        self._measure()

    def _measure(self) -> None:
        held = len(self.buffers) * self._channel.bucket_bytes + sum(b.numel() for b in self._alone.values())
        self._stats.peak_buffer_bytes = max(self._stats.peak_buffer_bytes, held)
        if self._device is not None:
            measured = measured_buffer_bytes(self._device) - self._baseline
            self._stats.peak_measured_bytes = max(self._stats.peak_measured_bytes, measured)


def send_over_ipc(named_tensors: Iterable[tuple[str, torch.Tensor]], channel: IpcChannel, *,
                  sender_rank: int) -> dict:
    """Stream `named_tensors` to the engine worker of this rank's device; returns both sides' statistics once the
    engine has finished loading (until then every buffer stays alive: the engine may still read any of them)."""
    started = time.perf_counter()
    stats = TransferStats()
    with accept_engine(channel, sender_rank) as connection:
        connection.send(("hello", bytes(multiprocessing.current_process().authkey)))
        slots = _SenderSlots(connection, channel, stats)
        for bucket in pack_buckets(named_tensors, bucket_bytes=channel.bucket_bytes, acquire_slot=slots.acquire,
                                   standalone=slots.standalone):
            synchronize(bucket.buffer.device)
            if bucket.slot is None:
                key = slots.keep_alone(bucket.buffer)
                _send(connection, ("alone", key, reduce_tensor(bucket.buffer), bucket.tensors), peer=ENGINE)
                stats.alone += 1
            else:
                message = ("bucket", bucket.slot, slots.handle_once(bucket.slot), bucket.tensors, slots.limit)
                _send(connection, message, peer=ENGINE)
                stats.buckets += 1
            stats.tensors += len(bucket.tensors)
            stats.bytes += sum(entry.nbytes for entry in bucket.tensors)
        _send(connection, ("end", stats.tensors), peer=ENGINE)
        engine = _wait_done(connection, channel)  # `slots` keeps every buffer alive until the engine is done
    stats.seconds = time.perf_counter() - started
    return {"sender": stats.as_dict(), "engine": engine}


def _wait_done(connection: Connection, channel: IpcChannel) -> dict:
    while True:
        message = _receive(connection, channel.timeout_s, peer=ENGINE)
        if message[0] == "done":
            return message[1]
        if message[0] in ("release", "release_alone", "starved"):
            continue  # releases after the last bucket: the buffers go when the transfer returns
        raise WeightSyncError(f"refit: unexpected message from the engine worker: {message[0]!r}")


# ----------------------------------------------------------------------------------------------- engine side


@dataclass
class IpcReceiver:
    """The engine worker's side of one refit: `buckets()` gives the tensors as views, bucket by bucket; `finish()`
    after the load."""

    channel: IpcChannel
    sender_rank: int
    check_name: Callable[[str], None] | None = None  # raises WeightSyncError for a name the engine lacks
    stats: TransferStats = field(default_factory=TransferStats)

    def __post_init__(self) -> None:
        self._started = time.perf_counter()
        self._connection = connect_to_sender(self.channel, self.sender_rank)
        self._peer = f"policy rank {self.sender_rank}"
        hello = _receive(self._connection, self.channel.timeout_s, peer=self._peer)
        if hello[0] != "hello":
            raise WeightSyncError(f"refit: {self._peer} did not start with hello ({hello[0]!r})")
        self._sender_key = hello[1]
        self._guard = BufferGuard()
        self._slots: dict[int, torch.Tensor] = {}
        self._sender_slots = 0
        self._starved_at = 0  # the sender's slot count when this side last asked for one more
        self._device: torch.device | None = None

    def buckets(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Each message's tensors as (name, view) pairs, one list per bucket (buckets.hand_out); a buffer goes back
        to the sender once nothing references it."""
        while True:
            self._release_unused()
            message = self._next_message()
            if message[0] == "end":
                self.stats.tensors = message[1]
                return
            key, entries = self._take(message)
            yield from hand_out(self._guard.buffers[key], entries, self.check_name)

    def _take(self, message: tuple) -> tuple[tuple, tuple[PackedTensor, ...]]:
        match message:
            case ("bucket", slot, handle, entries, sender_slots):
                if handle is not None:
                    self._slots[slot] = self._rebuild(handle)
                    self.stats.slots = len(self._slots)
                self._sender_slots = sender_slots
                key, buffer = ("slot", slot), self._slots[slot]
                self.stats.buckets += 1
            case ("alone", alone_key, handle, entries):
                key, buffer = ("alone", alone_key), self._rebuild(handle)
                self.stats.alone += 1
            case _:
                raise WeightSyncError(f"refit: unexpected message from {self._peer}: {message[0]!r}")
        self._device = buffer.device
        self._guard.hold(key, buffer)
        self.stats.bytes += sum(entry.nbytes for entry in entries)
        self._measure()
        return key, entries

    def _rebuild(self, handle: tuple) -> torch.Tensor:
        rebuild, args = handle
        if rebuild is rebuild_cuda_tensor:
            args = list(args)
            args[6] = torch.cuda.current_device()  # the storage device: the same GPU, maybe another index here
        return rebuild(*args)

    def _next_message(self) -> tuple:
        held_slots = sum(1 for kind, _ in self._guard.buffers if kind == "slot")
        every_slot_held = self._sender_slots and held_slots >= self._sender_slots
        if every_slot_held and self._starved_at < self._sender_slots and not self._connection.poll(0):
            _send(self._connection, ("starved",), peer=self._peer)  # the engine reads every slot: one more
            self._starved_at = self._sender_slots
            self.stats.starved += 1
        with _process_authkey(self._sender_key):
            return _receive(self._connection, self.channel.timeout_s, peer=self._peer)

    def _release_unused(self) -> None:
        free = self._guard.free_keys()
        if free and self._device is not None:
            synchronize(self._device)  # the engine's copies out of the buffer have run
        for kind, index in free:
            self._guard.drop((kind, index))
            _send(self._connection, ("release", index) if kind == "slot" else ("release_alone", index),
                  peer=self._peer)

    def _measure(self) -> None:
        held = sum(buffer.numel() for buffer in self._guard.buffers.values())
        self.stats.peak_buffer_bytes = max(self.stats.peak_buffer_bytes, held)
        if self._device is not None and self._device.type == "cpu":
            self.stats.peak_measured_bytes = max(self.stats.peak_measured_bytes, shared_memory_mapped_bytes())

    def finish(self) -> dict:
        """After the engine's load: tell the sender (which then frees its buffers) and drop every mapping."""
        self.stats.seconds = time.perf_counter() - self._started
        self._guard.clear()
        self._slots.clear()
        with contextlib.closing(self._connection):
            _send(self._connection, ("done", self.stats.as_dict()), peer=self._peer)
        return self.stats.as_dict()

    def abort(self) -> None:
        """A failed load: drop every mapping and close the channel (the sender's next read raises)."""
        self._guard.clear()
        self._slots.clear()
        self._connection.close()
