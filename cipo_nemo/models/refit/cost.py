"""What one refit costs (every step), per transport: what moves where, the buffers it holds, and its time at stated
rates, each with its source. The dry run prints it (plan.py); the chosen transport's buffers enter the per-GPU peak.

Every transport starts with the same gather: megatron-bridge gives every policy rank the full HF tensors, TP shards
all-gathered inside their stage (NVLink) and each pipeline stage's tensors broadcast to the other stages (NVLink
inside a node, InfiniBand across nodes). Then:
- file: each node's first rank copies them to host memory and writes one /dev/shm file, which every engine rank of
  the node maps and loads (shm_file.py);
- ipc: every GPU's policy rank copies them into reusable device buckets, whose CUDA IPC handles the vLLM worker on
  the same GPU maps and loads from (ipc.py): no host copy;
- broadcast: policy rank 0 packs the same buckets and broadcasts them to every engine worker over NCCL
  (broadcast.py): for engines on other devices.
The engine side then runs vLLM's layerwise load, a fixed cost per decoder layer.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cipo_nemo.models.refit.layout import SLOTS, plan_buckets
from cipo_nemo.models.shapes import ModelShape

GIB = 2**30
SHARED_MEMORY = Path("/dev/shm")


@dataclass(frozen=True)
class Rate:
    value: float  # GB/s, or seconds for the per-item costs
    source: str


REACHABLE = 0.8  # ours, assumed: the share of a link's published rate NCCL's collectives reach
RATES = {
    "nvlink": Rate(450 * REACHABLE, "published: NVLink 4, 900 GB/s per H100 in both directions, 450 each way "
                                     "(NVIDIA H100 datasheet); x 0.8 reachable (ours, assumed)"),
    "infiniband": Rate(50 * REACHABLE, "published: one ConnectX-7 NDR 400 Gb/s (50 GB/s) per GPU (NVIDIA DGX H100 "
                                       "user guide); x 0.8 reachable (ours, assumed)"),
    "device_copy": Rate(3350 / 2, "published: H100 SXM HBM3 3.35 TB/s (NVIDIA H100 datasheet); a copy reads and "
                                  "writes every byte: half (H200: 4.8 TB/s, faster)"),
    "device_to_host": Rate(10.0, "ours, assumed: one rank copying gathered tensors into pageable host memory (PCIe "
                                 "Gen5 x16: 64 GB/s each way, NVIDIA H100 datasheet)"),
    "shm_write": Rate(2.0, "ours, measured: one thread writing /dev/shm reached 2.5-3.3 GB/s on this project's CPU "
                           "machine (docs/notes/refit.md)"),
    "file_load": Rate(10.0, "ours, assumed: each engine rank reading its shard of the mapped file onto its GPU"),
    "per_layer": Rate(0.01, "ours, measured on CPU: vLLM's layerwise reload of SmolLM2 (30 layers) spent ~0.17 s "
                            "in its per-layer machinery besides repacking and copies (docs/notes/refit.md), ~0.006 s "
                            "a layer, taken as 0.01; not yet measured on a GPU"),
    "per_bucket": Rate(0.002, "ours, assumed: one socket round trip and one stream synchronize per bucket"),
}
CROSS_CHECK = ("NeMo-RL, published (NVIDIA-NeMo/RL pull request 2413): Qwen3-4B DP8 -> DP8 0.07-0.08 s, Qwen3-235B "
               "4.56-4.85 s, DeepSeek-V3 7.65-9.94 s per refit by NCCL to engines on other GPUs")


class ParallelLayout(Protocol):
    """Where the policy's ranks sit (the launch plan's Layout)."""

    num_nodes: int
    devices_per_node: int
    tensor_parallel: int
    pipeline_parallel: int


def stages_cross_nodes(layout: ParallelLayout) -> bool:
    """Megatron orders ranks TP first, PP last: a stage spans world / PP ranks, whole nodes when that is at least a
    node's GPUs."""
    world = layout.num_nodes * layout.devices_per_node
    return layout.num_nodes > 1 and world // layout.pipeline_parallel >= layout.devices_per_node


@dataclass(frozen=True)
class TransportEstimate:
    name: str
    moves: str  # what moves where
    stages: dict[str, tuple[float, str]]  # stage -> (seconds, the rate it used)
    device_buffer_bytes: int  # per GPU, beside the gathered tensor the export holds anyway
    host_bytes: int = 0  # per writing node (the file transport's /dev/shm file)
    note: str = ""

    @property
    def seconds(self) -> float:
        return sum(seconds for seconds, _ in self.stages.values())

    def line(self, *, chosen: bool) -> str:
        timing = " + ".join(f"{stage} {seconds:.2f} s" for stage, (seconds, _) in self.stages.items())
        memory = (f"{self.device_buffer_bytes / GIB:.1f} GiB of buckets per GPU" if self.device_buffer_bytes
                  else f"{self.host_bytes / GIB:.1f} GiB of host memory per writing node (/dev/shm)")
        mark = " (chosen)" if chosen else ""
        note = f"; {self.note}" if self.note else ""
        return f"  {self.name}{mark}: {self.moves}; {memory}; ~{self.seconds:.1f} s = {timing}{note}"


@dataclass(frozen=True)
class RefitEstimate:
    """One refit (every step): the HF-named weights by the chosen transport, with the others for comparison."""

    file_bytes: int  # the whole model in the policy's dtype (a tied output layer is not sent)
    writers: int  # file: one per node
    chosen: str
    transports: dict[str, TransportEstimate]
    on_gpu: bool
    shm_free_bytes: int | None  # this machine's /dev/shm; None without one (the temp dir is used)
    host_total_bytes: int | None  # this machine's MemTotal; None where /proc/meminfo is absent
    checked_here: bool  # this machine runs the workers (a CPU run, or a GPU run started on a GPU node)
    rates: dict[str, Rate] = field(default_factory=lambda: dict(RATES))

    @property
    def host_transient_bytes(self) -> int:
        """file: a writer's node holds the file itself (tmpfs is memory), kept from one refit to the next
        (RefitStaging reuses its pages); each gathered tensor is streamed into it, never a second host copy."""
        return self.file_bytes

    @property
    def seconds(self) -> float:
        return self.transports[self.chosen].seconds

    @property
    def device_buffer_bytes(self) -> int:
        return self.transports[self.chosen].device_buffer_bytes


def estimate_refit_cost(shape: ModelShape, *, precision: str, layout: ParallelLayout, engine_tensor_parallel: int,
                        on_gpu: bool, transport: str, bucket_bytes: int) -> RefitEstimate:
    """The refit of `shape` trained in `precision` (bf16 | fp32) at `layout`, into engines of
    `engine_tensor_parallel` ranks, by each transport."""
    dtype_bytes = 2 if precision == "bf16" else 4
    model_bytes = shape.total_params() * dtype_bytes
    tensors = hf_tensor_sizes(shape, dtype_bytes)
    shard = model_bytes / engine_tensor_parallel  # each engine rank loads its TP shard
    estimates = {"ipc": _ipc(shape, layout, model_bytes, shard, tensors, bucket_bytes),
                 "broadcast": _broadcast(shape, layout, model_bytes, shard, tensors, bucket_bytes),
                 "file": _file(layout, model_bytes, shard, on_gpu=on_gpu)}
    if not on_gpu:  # CPU runs: the file (the default), and the transport asked for (tests use them on CPU)
        estimates = {name: estimate for name, estimate in estimates.items() if name in ("file", transport)}
    return RefitEstimate(file_bytes=model_bytes, writers=layout.num_nodes, chosen=transport, transports=estimates,
                         on_gpu=on_gpu, shm_free_bytes=_shared_memory_free(), host_total_bytes=_host_memory_total(),
                         checked_here=not on_gpu or _has_cuda())


def hf_tensor_sizes(shape: ModelShape, dtype_bytes: int) -> list[tuple[str, int]]:
    """(name, bytes) of the HF tensors a Llama/Qwen-style export yields, in its order (the bucket count)."""
    h, kv = shape.hidden_size, shape.num_kv_heads * shape.head_dim
    q = shape.num_attention_heads * shape.head_dim
    sizes = [("embed", shape.embedding_params())]
    for layer in range(shape.num_layers):
        sizes += [(f"{layer}.{name}", elements) for name, elements in (
            ("q", q * h), ("k", kv * h), ("v", kv * h), ("o", h * q), ("gate", shape.ffn_hidden_size * h),
            ("up", shape.ffn_hidden_size * h), ("down", h * shape.ffn_hidden_size), ("norms", 2 * h))]
    sizes.append(("norm", h))
    if not shape.tied_embeddings:
        sizes.append(("lm_head", shape.embedding_params()))
    return [(name, elements * dtype_bytes) for name, elements in sizes]


def _gather(layout: ParallelLayout, model_bytes: int) -> dict[str, tuple[float, str]]:
    """Every rank ends with the full tensors: its stage's TP shards all-gathered, the other stages' tensors
    broadcast to it."""
    stages = {}
    stage_bytes = model_bytes / layout.pipeline_parallel
    if layout.tensor_parallel > 1:
        received = stage_bytes * (layout.tensor_parallel - 1) / layout.tensor_parallel
        stages["gather TP"] = (received / 1e9 / RATES["nvlink"].value, "nvlink")
    if layout.pipeline_parallel > 1:
        link = "infiniband" if stages_cross_nodes(layout) else "nvlink"
        received = model_bytes - stage_bytes
        stages[f"gather PP ({link})"] = (received / 1e9 / RATES[link].value, link)
    return stages


def _engine_load(shape: ModelShape, shard: float) -> dict[str, tuple[float, str]]:
    return {"engine load": (shard / 1e9 / RATES["device_copy"].value, "device_copy"),
            "engine layers": (shape.num_layers * RATES["per_layer"].value, "per_layer")}


def _bucket_counts(tensors: list[tuple[str, int]], bucket_bytes: int) -> tuple[int, int]:
    """(messages, the largest tensor sent alone or 0)."""
    messages = plan_buckets(tensors, bucket_bytes)
    alone = [nbytes for name, nbytes in tensors if nbytes > bucket_bytes]
    return len(messages), max(alone, default=0)


def _ipc(shape, layout, model_bytes, shard, tensors, bucket_bytes) -> TransportEstimate:
    messages, alone = _bucket_counts(tensors, bucket_bytes)
    stages = _gather(layout, model_bytes)
    stages["pack"] = (model_bytes / 1e9 / RATES["device_copy"].value, "device_copy")
    stages["handshakes"] = (messages * RATES["per_bucket"].value, "per_bucket")
    stages |= _engine_load(shape, shard)
    return TransportEstimate(
        name="ipc", moves=(f"every GPU's policy rank packs the gathered model into {bucket_bytes / GIB:g} GiB buckets "
                           f"({messages} messages) and the vLLM worker on its GPU maps them by CUDA IPC; nothing "
                           "touches the host"),
        stages=stages, device_buffer_bytes=SLOTS * bucket_bytes,
        note=f"tensors over a bucket sent alone as they are ({alone / GIB:.2f} GiB, no copy)" if alone else "")


def _broadcast(shape, layout, model_bytes, shard, tensors, bucket_bytes) -> TransportEstimate:
    messages, alone = _bucket_counts(tensors, bucket_bytes)
    stages = _gather(layout, model_bytes)
    stages["pack"] = (model_bytes / 1e9 / RATES["device_copy"].value, "device_copy")
    link = "infiniband" if layout.num_nodes > 1 else "nvlink"
    stages[f"broadcast ({link})"] = (model_bytes / 1e9 / RATES[link].value, link)
    stages |= _engine_load(shape, shard)
    return TransportEstimate(
        name="broadcast", moves=(f"policy rank 0 broadcasts the model in {bucket_bytes / GIB:g} GiB buckets to every "
                                 "engine worker over NCCL"),
        stages=stages, device_buffer_bytes=SLOTS * bucket_bytes + alone,
        note="for engines on their own devices (the next layout); NCCL cannot join two processes of one GPU")


def _file(layout, model_bytes, shard, *, on_gpu: bool) -> TransportEstimate:
    stages = _gather(layout, model_bytes) if on_gpu else {}
    if on_gpu:
        stages["device->host"] = (model_bytes / 1e9 / RATES["device_to_host"].value, "device_to_host")
    stages["write"] = (model_bytes / 1e9 / RATES["shm_write"].value, "shm_write")
    stages["engine reload"] = (shard / 1e9 / RATES["file_load"].value, "file_load")
    return TransportEstimate(
        name="file", moves=(f"the first rank of each of {layout.num_nodes} node(s) streams the gathered model into one "
                            "/dev/shm file that the node's engines map; the other ranks copy nothing to host memory"),
        stages=stages, device_buffer_bytes=0, host_bytes=model_bytes)


def refit_lines(refit: RefitEstimate) -> list[str]:
    """The dry run's refit section: every transport's estimate, the rates with their sources, the cross-check."""
    chosen = refit.transports[refit.chosen]
    lines = [f"refit per step: {refit.file_bytes / GIB:.1f} GiB of HF weights by {refit.chosen}, ~{chosen.seconds:.1f} "
             "s (estimates at the rates below; transports in order of preference for this layout):"]
    lines += [estimate.line(chosen=name == refit.chosen) for name, estimate in refit.transports.items()]
    used = {rate for estimate in refit.transports.values() for _, rate in estimate.stages.values()}
    lines += [f"    rate {name} {RATES[name].value:g} {'s' if name.startswith('per_') else 'GB/s'}: {RATES[name].source}"
              for name in RATES if name in used]
    if refit.on_gpu:
        lines.append(f"    cross-check: {CROSS_CHECK}")
    elif refit.chosen != "file":
        lines.append("    no GPU: the rates are a GPU's; on CPU the buckets move through shared memory or gloo "
                     "(docs/notes/refit.md has this machine's measurements)")
    if refit.chosen != "file":
        return lines
    if refit.checked_here:
        shm = "no /dev/shm (temp dir)" if refit.shm_free_bytes is None else \
            f"/dev/shm {refit.shm_free_bytes / GIB:.1f} GiB free"
        host = "" if refit.host_total_bytes is None else f", host memory {refit.host_total_bytes / GIB:.1f} GiB"
        lines.append(f"  this machine: {shm}{host}: {'fits' if not check_refit_host(refit) else 'DOES NOT FIT'}")
    else:
        lines.append("  /dev/shm and host memory are checked on a GPU node (this machine has no GPU)")
    return lines


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
    """file, on a machine that runs the workers: the file must fit /dev/shm (the loop writes it there whenever
    /dev/shm exists: a container's default 64 MiB fails mid-write), and host memory must hold it. The bucket
    transports use neither."""
    if not refit.checked_here or refit.chosen != "file":
        return []
    problems = []
    if refit.shm_free_bytes is not None and refit.shm_free_bytes < refit.file_bytes:
        problems.append(
            f"the refit file ({refit.file_bytes / GIB:.1f} GiB of HF weights, written every step) does not fit "
            f"/dev/shm on this machine ({refit.shm_free_bytes / GIB:.2f} GiB free); give the containers a larger "
            "/dev/shm (docker --shm-size, or a host /dev/shm mount), or refit.transport ipc on GPUs")
    if refit.host_total_bytes is not None and refit.host_total_bytes < refit.host_transient_bytes:
        problems.append(
            f"host memory ({refit.host_total_bytes / GIB:.1f} GiB) is smaller than the refit's file on a "
            f"writing node ({refit.host_transient_bytes / GIB:.1f} GiB: the weights file in "
            "/dev/shm)")
    return problems
