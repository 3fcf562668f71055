"""The refit as the controller calls it: policy -> generation engines, once per step, by one transport.

`build_refit_transport` picks the transport from the placement (`refit.transport: auto`) or the config:

| transport | where | what moves |
|---|---|---|
| `file` | no GPU (and wherever asked) | each node's first policy rank streams the HF tensors into one raw file in /dev/shm (shm_file.py); the node's engines map it |
| `ipc` | engines colocated on the policy's GPUs | every policy rank packs its gathered tensors into reusable device buckets; the engine worker on the same GPU maps them through CUDA IPC (ipc.py); nothing touches the host |
| `broadcast` | engines on other devices | policy rank 0 broadcasts the buckets to every engine worker over a group made at start (broadcast.py; NCCL) |

On CPU `ipc` shares the buckets through shared memory and `broadcast` runs over gloo: the same protocol code, so the
GPU logic is tested here; `auto` keeps the file there (measured at 4.3% of the CPU step, docs/notes/refit.md).

Memory order for a colocated engine, which sleeps when the refit starts (NeMo-RL's refit order): with the file the
policy exports while the engine sleeps and then returns its cached device memory, and the engine wakes its weights
only and reloads them; with buckets the engine's weights wake first and load while the policy streams (the device
then holds the engine's weights, the policy's gathered tensor and its buckets at once). The KV cache, the largest
allocation, comes back last in both.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from cipo_nemo.config.schema import RefitConfig
from cipo_nemo.models.interfaces import GenerationBackend, PolicyBackend, StreamingGeneration
from cipo_nemo.models.refit import broadcast, ipc
from cipo_nemo.models.refit.layout import MIB, resolve_transport
from cipo_nemo.models.refit.profile import RefitProfile

logger = logging.getLogger(__name__)

_SHARED_MEMORY = Path("/dev/shm")


# ----------------------------------------------------------------------------------------------- transports


class FileTransport:
    """One raw tensor file per node in /dev/shm (shm_file.py), written by each node's first policy rank."""

    name = "file"

    def refit(self, policy: PolicyBackend, generation: GenerationBackend) -> int:
        profile = RefitProfile("driver")
        with refit_file() as path:
            with profile.stage("export"):
                policy.export_hf_weights_to(path)
            try:
                generation.wake(tags=("weights",))
                with profile.stage("load"):
                    count = generation.update_weights_from_path(path)
            finally:
                with profile.stage("remove"):
                    policy.remove_exported_weights(path)
        generation.wake(tags=("kv_cache",))
        profile.write()
        return count

    def close(self) -> None:
        pass


class BucketTransport:
    """Buckets streamed while the engine loads: `ipc` (a fresh channel per refit) or `broadcast` (the group made
    here, once)."""

    def __init__(self, name: str, policy: PolicyBackend, generation: GenerationBackend, *, bucket_bytes: int,
                 timeout_s: float, on_gpu: bool) -> None:
        self.name = name
        self._bucket_bytes = bucket_bytes
        self._timeout_s = timeout_s
        self._group: broadcast.BroadcastGroup | None = None
        if name == "broadcast":
            self._group = self._make_group(policy, generation, backend="nccl" if on_gpu else "gloo")

    def _make_group(self, policy: PolicyBackend, generation: GenerationBackend, *,
                    backend: str) -> broadcast.BroadcastGroup:
        name = f"refit-{secrets.token_hex(4)}"
        world_size = 1 + generation.num_engine_workers
        host, port = policy.open_refit_group(name, world_size, self._timeout_s)
        group = broadcast.BroadcastGroup(name=name, host=host, port=port, world_size=world_size, backend=backend,
                                         bucket_bytes=self._bucket_bytes, timeout_s=self._timeout_s)
        joining = generation.begin_join_refit_group(asdict(group))
        finish_both(lambda: policy.join_refit_group(asdict(group)), joining)
        logger.info("refit group %s: policy rank 0 + %d engine worker(s) over %s", name, world_size - 1, backend)
        return group

    def message(self) -> dict:
        """What one refit tells both sides (plain values: it crosses Ray and vLLM's collective_rpc)."""
        if self._group is not None:
            return {"transport": "broadcast", **asdict(self._group)}
        channel = ipc.IpcChannel.create(bucket_bytes=self._bucket_bytes, timeout_s=self._timeout_s)
        return {"transport": "ipc", **asdict(channel)}

    def refit(self, policy: PolicyBackend, generation: GenerationBackend) -> int:
        profile = RefitProfile("driver")
        message = self.message()
        generation.wake(tags=("weights",))  # the engine loads while the policy streams
        with profile.stage("stream"):
            receiving = generation.begin_weight_transfer(message)
            count = finish_both(lambda: policy.send_weights(message), receiving)
        generation.wake(tags=("kv_cache",))
        profile.write()
        return count

    def close(self) -> None:
        if self._group is not None:
            broadcast.leave_group(self._group.name)


def finish_both(send, receiving) -> object:
    """Run the sending side here while the receiving side (already started) runs; return the receiver's result.
    When both fail, report the side that caused it: the engine's own error (a name it has no parameter for, a
    stalled sender) unless it only saw the sender go away, then the sender's."""
    try:
        send()
    except BaseException as send_error:
        try:
            receiving.result()
        except Exception as receive_error:  # noqa: BLE001 - one of the two errors is raised below
            if "closed the channel" not in str(receive_error):
                raise receive_error from send_error
        raise
    return receiving.result()


def build_refit_transport(refit: RefitConfig, policy: PolicyBackend, generation: GenerationBackend, *,
                          on_gpu: bool, colocated: bool) -> FileTransport | BucketTransport:
    """The run's transport, made once (broadcast makes its process group here)."""
    name = resolve_transport(refit, on_gpu=on_gpu, colocated=colocated,
                             vllm=isinstance(generation, StreamingGeneration))
    logger.info("refit transport: %s%s", name, f" ({refit.bucket_mb} MiB buckets)" if name != "file" else "")
    if name == "file":
        return FileTransport()
    return BucketTransport(name, policy, generation, bucket_bytes=refit.bucket_mb * MIB, timeout_s=refit.timeout_s,
                           on_gpu=on_gpu)


def refit_weights(policy: PolicyBackend, generation: GenerationBackend,
                  transport: FileTransport | BucketTransport | None = None) -> int:
    """Policy -> generation by `transport` (the file when none is given); returns the engine parameters updated."""
    return (transport or FileTransport()).refit(policy, generation)


@contextmanager
def refit_file() -> Iterator[Path]:
    """A fresh path for one weight hand-off (in /dev/shm when there is one), removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="cipo-refit-", dir=_SHARED_MEMORY if _SHARED_MEMORY.is_dir() else None))
    try:
        yield directory / "weights.pt"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- both sides


def send_weights(named_tensors: Iterable[tuple[str, torch.Tensor]], message: dict, *, rank: int) -> dict | None:
    """The policy side of a bucket refit, on policy rank `rank` (every rank iterates `named_tensors`: the
    gather behind it is collective); returns the transfer's statistics where this rank sent."""
    fields = {key: value for key, value in message.items() if key != "transport"}
    if message["transport"] == "ipc":
        return ipc.send_over_ipc(named_tensors, ipc.IpcChannel(**fields), sender_rank=rank)
    if rank == broadcast.SENDER:
        return broadcast.send_over_broadcast(named_tensors, broadcast.BroadcastGroup(**fields))
    for _ in named_tensors:  # take part in the gather, send nothing
        pass
    return None


def weight_receiver(message: dict, *, engine_rank: int, check_name) -> ipc.IpcReceiver | broadcast.BroadcastReceiver:
    """The engine side of a bucket refit for the engine worker whose device is cluster rank `engine_rank`
    (the engine's first bundle plus the worker's TP rank)."""
    fields = {key: value for key, value in message.items() if key != "transport"}
    if message["transport"] == "ipc":
        return ipc.IpcReceiver(ipc.IpcChannel(**fields), sender_rank=engine_rank, check_name=check_name)
    return broadcast.BroadcastReceiver(broadcast.BroadcastGroup(**fields), rank=1 + engine_rank,
                                       check_name=check_name)
