"""The placement sections of the schema (schema.py, which re-exports them): where the sides run (`cluster`), how the
policy's weights reach the engines (`refit`), and how far generation may run ahead of training (`async`).
The rules of schema.py's docstring hold here too; the cross-section checks are MasterConfig's validators."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from cipo_nemo.config.fields import NonNegativeInt, PositiveFloat, PositiveInt, StrictModel


class ClusterConfig(StrictModel):
    num_nodes: PositiveInt = Field(description="Nodes in the Ray cluster.")
    devices_per_node: PositiveInt = Field(description="GPUs per node (on CPU: worker processes per node).")
    gpu_memory_gib: PositiveFloat | None = Field(
        description="Memory of one GPU in GiB, the budget of the dry run's per-GPU estimate (null: CPU worker processes)."
    )
    gpu_arch: Literal["ampere", "hopper", "blackwell"] | None = Field(
        description="GPU generation (A100: ampere; H100/H200: hopper; B200/GB200: blackwell); the dry run checks the "
        "FP8 settings against it (null: CPU, or not checked)."
    )
    ray_address: str | None = Field(description="Existing Ray cluster to join (null: start one in-process).")
    max_restarts: Annotated[int, Field(ge=0)] = Field(
        description="Worker deaths (OOM kill, crash) a run survives: the driver exits 75 to be requeued and resume "
        "from the last checkpoint, this many times per run directory; the next death ends the run (exit code 70)."
    )
    cpu_keep_memory: bool = Field(
        description="Without GPUs: the policy and generation workers put tensors on transparent huge pages and keep "
        "freed memory for the next step instead of returning it to the OS (no page faults once the steps repeat; "
        "each worker keeps its peak memory). cipo_nemo/utils/cpu_memory.py."
    )
    generation_devices_per_node: PositiveInt | None = Field(
        description="generation.colocated false: the vLLM engines' own devices per node, beside devices_per_node for "
        "the policy (CPU: worker cores, each side bound to its own); null when colocated."
    )
    max_engine_restarts: NonNegativeInt = Field(
        description="A dead generation engine is replaced in place (refit, the interrupted batch sampled again with "
        "the same seeds, no requeue) this many times per driver process; the next death is a worker death."
    )


class AsyncConfig(StrictModel):
    """One step off-policy (docs/notes/async.md): the next step's rollouts are sampled while the policy trains."""

    enabled: bool = Field(description="Sample batch s+1 in the background while the policy trains on batch s.")
    max_trajectory_age: Literal[0, 1] = Field(
        description="Weight versions a trained batch may lag: 1, batch s is sampled by the weights after step s-2 "
        "(the pipeline is one step deep); 0, the same machinery without overlap (equals the synchronous loop)."
    )
    max_wait_s: PositiveFloat = Field(
        description="The trainer waits at most this long for the next batch; longer, the run stops with one line "
        "and exit code 75 (requeue), and the resumed run samples that batch again."
    )


class RefitConfig(StrictModel):
    """How the policy's weights reach the generation engines every step (cipo_nemo/models/refit/, docs/notes/refit.md)."""

    transport: Literal["auto", "file", "ipc", "broadcast"] = Field(
        description="auto: file without GPUs, ipc for engines colocated on the policy's GPUs, broadcast for engines "
        "on other devices; file: one raw tensor file per node in /dev/shm; ipc: buckets shared through torch's "
        "tensor reductions (CUDA IPC; shared memory on CPU); broadcast: buckets broadcast over a process group made "
        "at start (NCCL; gloo on CPU)."
    )
    bucket_mb: PositiveInt = Field(description="ipc / broadcast: bucket size in MiB (two in flight); a tensor larger "
                                   "than a bucket is sent alone.")
    timeout_s: PositiveFloat = Field(description="ipc / broadcast: the other side silent this long fails the refit "
                                     "and stops the run (a side that died stops it at once).")
