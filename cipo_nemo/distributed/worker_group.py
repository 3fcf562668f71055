"""Worker groups: one Ray actor per virtual-cluster bundle, forming one torch.distributed world.

Each actor is a generic host (``_WorkerHost``). At start-up the group:
1. places one host per bundle (``resource_fraction`` of the bundle's CPU/GPU, so two groups can share bundles:
   colocated policy + generation, as NeMo-RL's ``max_colocated_worker_groups``);
2. asks every host for its node and GPU, and rank 0 for a free port on its node (MASTER_PORT);
3. starts all hosts at once: each sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
   MASTER_PORT, initializes the default process group (gloo on CPU, nccl on GPU) when ``torch_distributed``, and
   only then unpickles and constructs ``worker_cls(**init_kwargs)``, so the worker's imports see the final
   environment.

Threads: Ray sets ``OMP_NUM_THREADS`` to the actor's CPU count (at least 1) in every actor. The group does not
override it; a worker that wants more threads passes ``env_vars={"OMP_NUM_THREADS": "2"}`` (set from process
start through the actor's runtime_env, before torch is imported) or calls ``torch.set_num_threads``.

GPUs: Ray limits ``CUDA_VISIBLE_DEVICES`` to the actor's own GPU. As Ray Train does, a ``torch_distributed``
group widens it to all GPUs its actors hold on that node (NCCL then sees its peers for P2P/NVLink), and
``LOCAL_RANK`` is the index of the actor's GPU in that list; the host calls ``torch.cuda.set_device(LOCAL_RANK)``
before NCCL starts. Any other group keeps Ray's single-GPU list (``LOCAL_RANK`` 0): a program in it that takes
``cuda:0`` (vLLM's uniprocess executor does) must get its own GPU, not the node's first one.
A group with ``actor_gpus=False`` holds only its CPU share: its workers start child actors that take the GPU
shares themselves (vLLM's Ray executor, which finds the node's placement group through
``ray.util.get_current_placement_group()``), and Ray 2.60 leaves ``CUDA_VISIBLE_DEVICES`` of a zero-GPU actor
as it is.

Failures never hang the driver: a method that raises becomes ``WorkerError`` carrying the remote traceback; an
actor that dies (``os._exit``, OOM killer) becomes ``WorkerDiedError`` naming the worker as soon as Ray notices;
every call also takes ``timeout_s``. A worker that owns processes of its own (vLLM's engine core) names, in
``process_death_errors``, the exception types that mean one of them died: those become ``WorkerDiedError`` too,
so the driver sees one kind of error for "a process of this worker is gone" (cipo_nemo/__main__.py turns it into a
requeue).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray import cloudpickle
from ray.actor import ActorHandle
from ray.exceptions import RayActorError, RayError, RayTaskError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cipo_nemo.distributed.cluster import VirtualCluster
from cipo_nemo.distributed.cpu_binding import CORES_ENV, bind_from_environment, format_cores

logger = logging.getLogger(__name__)

# How long a failed collective call waits for Ray to report that a peer rank died (Ray notices an actor's exit
# within about a second on one node).
PEER_DEATH_GRACE_S = 5.0


class WorkerError(RuntimeError):
    """A worker failed: names the group, rank, node/bundle and method, and carries the remote traceback."""

    def __init__(self, *, group: str, rank: int, where: str, method: str, detail: str, remote_traceback: str = ""):
        self.group = group
        self.rank = rank
        self.where = where
        self.method = method
        self.detail = detail
        self.remote_traceback = remote_traceback
        message = f"worker group '{group}' rank {rank} ({where}) failed in {method}: {detail}"
        if remote_traceback:
            message += f"\n--- remote traceback (rank {rank}) ---\n{remote_traceback.rstrip()}"
        super().__init__(message)


class WorkerTimeoutError(WorkerError):
    """A call did not finish within its ``timeout_s``; the worker may still be running it."""


class WorkerDiedError(WorkerError):
    """The worker's actor process is gone (exited, crashed, killed by the OOM killer or by Ray), or a process the
    worker owns is (an exception named in its ``process_death_errors``)."""

    during: str | None = None  # what the run was doing, set by the loop: "step 3, stage train"

    def summary(self) -> str:
        """One line: which worker, where, in which call, what happened (and in which step and stage)."""
        during = f" ({self.during})" if self.during else ""
        return (f"worker group '{self.group}' rank {self.rank} ({self.where}) died in {self.method}{during}: "
                f"{self.detail}")


class _RemoteFailure(Exception):
    """Raised inside the host instead of the worker's exception: a plain, always-picklable carrier of the
    exception type, message and the worker-side traceback (without Ray's own frames)."""

    def __init__(self, type_name: str, message: str, traceback_text: str, process_died: bool = False) -> None:
        super().__init__(type_name, message, traceback_text, process_died)
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text
        self.process_died = process_died  # the type (or one in its cause chain) is in the worker's process_death_errors


@dataclass(frozen=True)
class WorkerPlacement:
    """Where one rank runs."""

    rank: int
    node_group: int  # index of the cluster's placement group (one per requested node)
    bundle_index: int
    node_ip: str = "?"
    pid: int = -1

    def describe(self) -> str:
        return f"node {self.node_ip}, placement group {self.node_group}, bundle {self.bundle_index}, pid {self.pid}"


class _WorkerHost:
    """Generic Ray actor that sets up the rank's environment, then hosts one worker object."""

    def __init__(self) -> None:
        self.worker: Any = None

    def node_info(self) -> dict[str, Any]:
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "gpu_ids": [str(gpu_id) for gpu_id in ray.get_gpu_ids()],
            "pid": os.getpid(),
        }

    def free_port(self) -> int:
        # Bind-and-release leaves a short race with other processes; NeMo-RL and torchrun accept the same.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("", 0))
            return sock.getsockname()[1]

    def start(self, *, env: dict[str, str], worker_cls_pickle: bytes, init_kwargs: dict, backend: str | None) -> None:
        try:
            os.environ.update(env)
            bind_from_environment()  # CPU, sides apart: before the worker's libraries start their threads
            if backend is not None:
                _init_process_group(backend)
            worker_cls = cloudpickle.loads(worker_cls_pickle)
            self.worker = worker_cls(**init_kwargs)
        except Exception as exc:
            raise _as_remote_failure(exc) from None

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self.worker, method)(*args, **kwargs)
        except Exception as exc:
            death_errors = getattr(self.worker, "process_death_errors", ())
            raise _as_remote_failure(exc, process_died=means_process_death(exc, death_errors)) from None

    def shutdown_worker(self) -> None:
        """Run the worker's own ``shutdown`` (e.g. close a vLLM engine in this process), then leave the world."""
        try:
            if self.worker is not None and hasattr(self.worker, "shutdown"):
                self.worker.shutdown()
            self.worker = None
            _maybe_destroy_process_group()
        except Exception as exc:
            raise _as_remote_failure(exc) from None


def _as_remote_failure(exc: Exception, *, process_died: bool = False) -> _RemoteFailure:
    return _RemoteFailure(type(exc).__name__, str(exc), traceback.format_exc(), process_died)


def means_process_death(exc: BaseException, death_errors: Sequence[str]) -> bool:
    """Whether `exc`, or an exception it was raised from or while handling, has a type named in `death_errors`
    (names, not classes: the worker group must not import what its workers use, e.g. vLLM)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if type(current).__name__ in death_errors:
            return True
        current = current.__cause__ or current.__context__
    return False


def _init_process_group(backend: str) -> None:
    import torch
    import torch.distributed as dist

    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
    )


def _maybe_destroy_process_group() -> None:
    # Only a host that set up a world has torch.distributed loaded; don't import torch just to check.
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class WorkerCalls:
    """Futures of one method call on several ranks; ``get`` returns results in rank order or raises WorkerError.

    ``refs`` are Ray object refs, which can be handed to another group's call without passing through the driver.
    """

    group: WorkerGroup
    method: str
    ranks: list[int]
    refs: list[ray.ObjectRef]

    def get(self, timeout_s: float | None = None) -> list:
        return self.group._gather(self.refs, self.ranks, method=self.method, timeout_s=timeout_s)


class WorkerGroup:
    """One actor per cluster bundle hosting ``worker_cls(**init_kwargs)``; rank i sits on ``cluster.bundles()[i]``.

    ``resource_fraction`` (0, 1] is the share of each bundle's CPU (and GPU) every actor asks for: two groups
    with 0.5 colocate on the same bundles. ``actor_gpus=False``: the actors ask for no GPU (child actors of the
    workers take it); ``capture_child_tasks``: tasks and actors a worker starts without a scheduling strategy are
    placed in its node's placement group too (on a fully reserved cluster they would find no resources outside
    it). Placement must succeed within ``placement_timeout_s``; worker construction (which may load a large
    model) waits ``start_timeout_s`` (None: no limit, but a dead actor still fails at once). The group is a
    context manager that calls ``shutdown`` on exit.
    """

    def __init__(
        self,
        cluster: VirtualCluster,
        worker_cls: type,
        *,
        name: str,
        init_kwargs: dict,
        resource_fraction: float = 1.0,
        env_vars: dict[str, str] | None = None,
        torch_distributed: bool = True,
        actor_gpus: bool = True,
        capture_child_tasks: bool = False,
        placement_timeout_s: float = 60.0,
        start_timeout_s: float | None = None,
        node_cores: Sequence[Sequence[int]] | None = None,
    ) -> None:
        if not 0.0 < resource_fraction <= 1.0:
            raise ValueError(f"worker group '{name}': resource_fraction must be in (0, 1], got {resource_fraction}")
        self.name = name
        self.worker_cls_name = worker_cls.__name__
        self._use_gpus = cluster.use_gpus and actor_gpus
        self._node_cores = node_cores
        self.placements = [
            WorkerPlacement(rank=rank, node_group=rank // cluster.devices_per_node, bundle_index=bundle_index)
            for rank, (_, bundle_index) in enumerate(cluster.bundles())
        ]
        self._hosts = _create_hosts(cluster, resource_fraction=resource_fraction, env_vars=env_vars or {},
                                    actor_gpus=actor_gpus, capture_child_tasks=capture_child_tasks)
        try:
            self._start(
                worker_cls,
                init_kwargs=init_kwargs,
                torch_distributed=torch_distributed,
                placement_timeout_s=placement_timeout_s,
                start_timeout_s=start_timeout_s,
            )
        except BaseException:
            self._kill_hosts()
            raise
        logger.info("worker group '%s': %d x %s started", name, self.world_size, self.worker_cls_name)

    @property
    def world_size(self) -> int:
        return len(self.placements)

    def run_all_async(self, method: str, *args: Any, **kwargs: Any) -> WorkerCalls:
        """Call ``method(*args, **kwargs)`` on every rank; arguments go to Ray's object store once, not per rank."""
        args = tuple(_put_once(arg) for arg in args)
        kwargs = {key: _put_once(value) for key, value in kwargs.items()}
        refs = [host.call.remote(method, *args, **kwargs) for host in self._live_hosts()]
        return WorkerCalls(self, method, list(range(self.world_size)), refs)

    def run_all(self, method: str, *args: Any, timeout_s: float | None = None, **kwargs: Any) -> list:
        """One result per rank, in rank order. ``timeout_s`` is reserved (not passed to the worker)."""
        return self.run_all_async(method, *args, **kwargs).get(timeout_s)

    def run_on(self, rank: int, method: str, *args: Any, timeout_s: float | None = None, **kwargs: Any) -> Any:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"worker group '{self.name}' has ranks 0..{self.world_size - 1}, not {rank}")
        ref = self._live_hosts()[rank].call.remote(method, *args, **kwargs)
        return WorkerCalls(self, method, [rank], [ref]).get(timeout_s)[0]

    def run_sharded_async(
        self, method: str, shards: Sequence, *, dp_rank_of: Sequence[int], **kwargs: Any
    ) -> WorkerCalls:
        """Rank i gets ``shards[dp_rank_of[i]]`` as first argument: data-parallel sharding, replicated over the
        ranks of one DP group (TP/PP/CP peers get the same shard). Each shard is stored once."""
        _check_dp_rank_of(self.name, dp_rank_of, world_size=self.world_size, num_shards=len(shards))
        shard_refs = [ray.put(shard) for shard in shards]
        kwargs = {key: _put_once(value) for key, value in kwargs.items()}
        refs = [
            host.call.remote(method, shard_refs[dp_rank], **kwargs)
            for host, dp_rank in zip(self._live_hosts(), dp_rank_of, strict=True)
        ]
        return WorkerCalls(self, method, list(range(self.world_size)), refs)

    def run_sharded(
        self,
        method: str,
        shards: Sequence,
        *,
        dp_rank_of: Sequence[int],
        timeout_s: float | None = None,
        **kwargs: Any,
    ) -> list:
        return self.run_sharded_async(method, shards, dp_rank_of=dp_rank_of, **kwargs).get(timeout_s)

    def shutdown(self, timeout_s: float = 120.0) -> None:
        """Call each worker's optional ``shutdown`` (in its own process), then kill the actors. Idempotent.

        Ranks whose actor already died are skipped with a warning; a worker ``shutdown`` that raises is re-raised
        as WorkerError after every actor is killed.
        """
        if not self._hosts:
            return
        refs = [host.shutdown_worker.remote() for host in self._hosts]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        failures: list[WorkerError] = []
        for rank, ref in enumerate(refs):
            if ref not in ready:
                logger.warning("worker group '%s' rank %d: shutdown over %.0f s; killing", self.name, rank, timeout_s)
                continue
            try:
                self._get_one(ref, rank, method="shutdown")
            except WorkerDiedError as error:
                logger.warning("worker group '%s' rank %d was already dead at shutdown: %s", self.name, rank, error)
            except WorkerError as error:
                failures.append(error)
        self._kill_hosts()
        if failures:
            raise failures[0]

    def __enter__(self) -> WorkerGroup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def _start(
        self,
        worker_cls: type,
        *,
        init_kwargs: dict,
        torch_distributed: bool,
        placement_timeout_s: float,
        start_timeout_s: float | None,
    ) -> None:
        infos = self._gather(
            [host.node_info.remote() for host in self._hosts],
            list(range(self.world_size)),
            method="placement (actor start)",
            timeout_s=placement_timeout_s,
        )
        self.placements = [
            WorkerPlacement(p.rank, p.node_group, p.bundle_index, info["node_ip"], info["pid"])
            for p, info in zip(self.placements, infos, strict=True)
        ]
        master_port = self._run_on_host(0, "free_port", timeout_s=placement_timeout_s)
        envs = build_rank_envs(infos, use_gpus=self._use_gpus, share_node_gpus=torch_distributed,
                               master_port=master_port)
        for env in envs if self._node_cores is not None else []:
            env[CORES_ENV] = format_cores(self._node_cores[int(env["LOCAL_RANK"])])
        backend = ("nccl" if self._use_gpus else "gloo") if torch_distributed else None
        worker_cls_pickle = cloudpickle.dumps(worker_cls)
        kwargs_ref = ray.put(init_kwargs)
        # All ranks start at once: init_process_group is a collective over the whole world.
        refs = [
            host.start.remote(env=env, worker_cls_pickle=worker_cls_pickle, init_kwargs=kwargs_ref, backend=backend)
            for host, env in zip(self._hosts, envs, strict=True)
        ]
        constructor = f"{self.worker_cls_name}.__init__"
        self._gather(refs, list(range(self.world_size)), method=constructor, timeout_s=start_timeout_s)

    def _run_on_host(self, rank: int, host_method: str, *, timeout_s: float | None) -> Any:
        ref = getattr(self._hosts[rank], host_method).remote()
        return self._gather([ref], [rank], method=host_method, timeout_s=timeout_s)[0]

    def _live_hosts(self) -> list[ActorHandle]:
        if not self._hosts:
            raise RuntimeError(f"worker group '{self.name}' was shut down")
        return self._hosts

    def _kill_hosts(self) -> None:
        hosts, self._hosts = self._hosts, []
        for host in hosts:
            ray.kill(host, no_restart=True)

    def _gather(self, refs: list[ray.ObjectRef], ranks: list[int], *, method: str, timeout_s: float | None) -> list:
        """Results in the order of ``ranks``; raises at the first failure instead of waiting for the rest (peers
        of a dead rank may block forever in a collective)."""
        pending = dict(zip(refs, ranks, strict=True))
        results: dict[int, Any] = {}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while pending:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=remaining)
            if not ready:
                raise self._timeout_error(sorted(pending.values()), method=method, timeout_s=timeout_s)
            for ref in ready:
                rank = pending.pop(ref)
                try:
                    results[rank] = self._get_one(ref, rank, method=method)
                except WorkerDiedError:
                    raise
                except WorkerError as error:
                    raise self._dead_peer(pending, method=method) or error from None
        return [results[rank] for rank in ranks]

    def _dead_peer(self, pending: dict[ray.ObjectRef, int], *, method: str) -> WorkerDiedError | None:
        """When a rank dies inside a collective, its peers fail too (gloo: the connection closed), often before Ray
        reports the death: give Ray PEER_DEATH_GRACE_S to report one, so the cause, not the symptom, is raised."""
        if not pending:
            return None
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=PEER_DEATH_GRACE_S)
        for ref in ready:
            try:
                self._get_one(ref, pending[ref], method=method)
            except WorkerDiedError as death:
                return death
            except WorkerError:
                continue
        return None

    def _get_one(self, ref: ray.ObjectRef, rank: int, *, method: str) -> Any:
        try:
            return ray.get(ref)
        except RayError as exc:
            where = self.placements[rank].describe()
            raise worker_error_of(exc, group=self.name, rank=rank, where=where, method=method) from None

    def _timeout_error(self, ranks: list[int], *, method: str, timeout_s: float | None) -> WorkerTimeoutError:
        detail = (
            f"no result within {timeout_s} s from ranks {ranks}; the call may still be running "
            "(shut the group down). At start-up this usually means the cluster's bundles lack the free "
            "resources this group asks for (resource_fraction, other groups on the same bundles)"
        )
        return WorkerTimeoutError(
            group=self.name, rank=ranks[0], where=self.placements[ranks[0]].describe(), method=method, detail=detail
        )


def worker_error_of(exc: RayError, *, group: str, rank: int, where: str, method: str) -> WorkerError:
    """What the driver sees of a failed call: WorkerDiedError when the actor, or a process the worker owns, died;
    WorkerError otherwise (the worker's exception type, message and traceback)."""
    error = dict(group=group, rank=rank, where=where, method=method)
    if isinstance(exc, RayTaskError):
        cause = exc.cause
        if not isinstance(cause, _RemoteFailure):
            return WorkerError(**error, detail=repr(cause), remote_traceback=str(exc))
        detail = f"{cause.type_name}: {cause.message}"
        if cause.process_died:
            return WorkerDiedError(**error, detail=f"a process of the worker died ({detail})",
                                   remote_traceback=cause.traceback_text)
        return WorkerError(**error, detail=detail, remote_traceback=cause.traceback_text)
    if isinstance(exc, RayActorError):  # ActorDiedError included
        detail = "the actor died (process exited, crashed or was killed, e.g. by the OOM killer)"
        return WorkerDiedError(**error, detail=detail, remote_traceback=f"Ray: {exc}")
    return WorkerError(**error, detail=type(exc).__name__, remote_traceback=f"Ray: {exc}")


def _create_hosts(
    cluster: VirtualCluster,
    *,
    resource_fraction: float,
    env_vars: dict[str, str],
    actor_gpus: bool,
    capture_child_tasks: bool,
) -> list[ActorHandle]:
    host_actor = ray.remote(_WorkerHost)
    options: dict[str, Any] = {
        "num_cpus": cluster.bundle_resources["CPU"] * resource_fraction,
        "num_gpus": resource_fraction if cluster.use_gpus and actor_gpus else 0,
        "max_restarts": 0,
    }
    if env_vars:
        # runtime_env env vars are set when the process starts (before torch/OpenMP initialize) and win over
        # Ray's own OMP_NUM_THREADS default.
        options["runtime_env"] = {"env_vars": dict(env_vars)}
    return [
        host_actor.options(
            **options,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=group,
                placement_group_bundle_index=bundle_index,
                placement_group_capture_child_tasks=capture_child_tasks,
            ),
        ).remote()
        for group, bundle_index in cluster.bundles()
    ]


def build_rank_envs(
    infos: list[dict[str, Any]], *, use_gpus: bool, share_node_gpus: bool, master_port: int
) -> list[dict[str, str]]:
    """torch.distributed environment for every rank from the hosts' node/GPU info (rank order).

    LOCAL_RANK counts the group's ranks on the same machine. With GPUs and ``share_node_gpus`` (a torch.distributed
    group), CUDA_VISIBLE_DEVICES is widened to the GPUs the group holds on that machine (sorted), and LOCAL_RANK is
    the index of the rank's own GPU in it. With GPUs and without it, CUDA_VISIBLE_DEVICES stays Ray's (the actor's
    own GPU) and LOCAL_RANK is 0, the only device the rank sees.
    """
    ranks_by_node: dict[str, list[int]] = {}
    for rank, info in enumerate(infos):
        ranks_by_node.setdefault(info["node_id"], []).append(rank)
    envs = []
    for rank, info in enumerate(infos):
        node_ranks = ranks_by_node[info["node_id"]]
        env = {
            "RANK": str(rank),
            "WORLD_SIZE": str(len(infos)),
            "LOCAL_RANK": str(node_ranks.index(rank)),
            "LOCAL_WORLD_SIZE": str(len(node_ranks)),
            "MASTER_ADDR": infos[0]["node_ip"],
            "MASTER_PORT": str(master_port),
        }
        if use_gpus and not share_node_gpus:
            env["LOCAL_RANK"] = "0"
        elif use_gpus:
            node_gpus = sorted({gpu for r in node_ranks for gpu in infos[r]["gpu_ids"]}, key=_gpu_sort_key)
            env["CUDA_VISIBLE_DEVICES"] = ",".join(node_gpus)
            env["LOCAL_RANK"] = str(node_gpus.index(info["gpu_ids"][0]))
        envs.append(env)
    return envs


def _gpu_sort_key(gpu_id: str) -> tuple[int, str]:
    return (int(gpu_id), "") if gpu_id.isdigit() else (0, gpu_id)


def _put_once(value: Any) -> Any:
    # Ray resolves top-level ObjectRef arguments, so every rank reads the same stored copy.
    return value if isinstance(value, ray.ObjectRef) else ray.put(value)


def _check_dp_rank_of(name: str, dp_rank_of: Sequence[int], *, world_size: int, num_shards: int) -> None:
    if len(dp_rank_of) != world_size:
        raise ValueError(f"worker group '{name}': dp_rank_of has {len(dp_rank_of)} entries for {world_size} ranks")
    if sorted(set(dp_rank_of)) != list(range(num_shards)):
        raise ValueError(
            f"worker group '{name}': dp_rank_of {list(dp_rank_of)} must use every shard index 0..{num_shards - 1} "
            f"(got {num_shards} shards)"
        )
