"""Build the tokenizer, the Ray cluster, the policy and the generation backend from the config.

Placement (docs/design.md "Architecture"): with `policy.backend: megatron` the policy is a worker group of
`cluster.num_nodes x cluster.devices_per_node` ranks; a vLLM generation group sits on the same bundles when
`generation.colocated` (each group takes half of every bundle, NeMo-RL's colocation by fractional resources), or on
a virtual cluster of its own, `cluster.generation_devices_per_node` bundles per node, when it is false (the
asynchronous loop samples while the policy trains). On a CPU machine the two sides are then bound to disjoint
cores (distributed/cpu_binding.py). The HF backends run in the controller process: small models, tests, and the
reference implementation.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from cipo_nemo.config import MasterConfig
from cipo_nemo.config.schema import PolicyConfig
from cipo_nemo.data.prompts import use_chat_template_file
from cipo_nemo.models.hub import resolve_model_dir
from cipo_nemo.models.interfaces import GenerationBackend, PolicyBackend
from cipo_nemo.utils.cpu_memory import cpu_memory_environment

logger = logging.getLogger(__name__)


def build_tokenizer(policy: PolicyConfig, *, chat_template: str | None) -> Any:
    """The policy's tokenizer (`policy.tokenizer` or the model's), with `data.chat_template` when set."""
    from transformers import AutoTokenizer

    source = resolve_model_dir(policy.tokenizer, key="policy.tokenizer") if policy.tokenizer else \
        resolve_model_dir(policy.model_name, policy.model_revision)
    tokenizer = AutoTokenizer.from_pretrained(source)
    return use_chat_template_file(tokenizer, chat_template)


def needs_ray(cfg: MasterConfig) -> bool:
    return cfg.policy.backend == "megatron" or cfg.generation.backend == "vllm"


@dataclass
class Placement:
    """The Ray bundles each side runs on: `policy` (Megatron) and `generation` (vLLM), the same virtual cluster
    when colocated; None for a side that runs in the controller (HF). `*_cores`: on a CPU machine with the sides
    apart, the cores each local rank is bound to (None: not bound)."""

    policy: Any
    generation: Any
    policy_cores: list[list[int]] | None = None
    generation_cores: list[list[int]] | None = None

    def shutdown(self) -> None:
        for cluster in {id(c): c for c in (self.policy, self.generation) if c is not None}.values():
            cluster.shutdown()


def apart(cfg: MasterConfig) -> bool:
    """The vLLM engines have devices of their own (generation.colocated false)."""
    return cfg.generation.backend == "vllm" and not cfg.generation.colocated


def build_cluster(cfg: MasterConfig) -> Placement:
    """Ray (started in-process unless cluster.ray_address names a running one) and each side's virtual cluster."""
    from cipo_nemo.distributed import VirtualCluster, init_ray
    from cipo_nemo.distributed.cpu_binding import split_node_cores

    init_ray(address=cfg.cluster.ray_address)
    cluster, gpus = cfg.cluster, torch.cuda.is_available()
    if not apart(cfg):
        shared = VirtualCluster(num_nodes=cluster.num_nodes, devices_per_node=cluster.devices_per_node, use_gpus=gpus)
        return Placement(policy=shared if cfg.policy.backend == "megatron" else None,
                         generation=shared if cfg.generation.backend == "vllm" else None)
    policy = VirtualCluster(num_nodes=cluster.num_nodes, devices_per_node=cluster.devices_per_node, use_gpus=gpus) \
        if cfg.policy.backend == "megatron" else None
    generation = VirtualCluster(num_nodes=cluster.num_nodes, devices_per_node=cluster.generation_devices_per_node,
                                use_gpus=gpus)
    placement = Placement(policy=policy, generation=generation)
    if not gpus:  # CPU: the sides compute at the same time, each on its own cores
        placement.policy_cores, placement.generation_cores = split_node_cores(
            sorted(os.sched_getaffinity(0)), policy_devices=cluster.devices_per_node if policy else 0,
            generation_devices=cluster.generation_devices_per_node,
            engine_tensor_parallel=cfg.generation.vllm.tensor_parallel)
        logger.info("CPU cores per rank: policy %s, generation %s", placement.policy_cores, placement.generation_cores)
    return placement


def _colocated_fraction(cfg: MasterConfig) -> float:
    both_on_ray = cfg.policy.backend == "megatron" and cfg.generation.backend == "vllm"
    return 0.5 if both_on_ray and cfg.generation.colocated else 1.0


def _worker_env(cfg: MasterConfig, cores: list[list[int]] | None = None) -> dict[str, str]:
    # Ray pins actors to OMP_NUM_THREADS=1. Colocated, the phases alternate (generate, then train), so each may use
    # the node; apart on a CPU, each rank uses its own cores (set from process start, before torch is imported).
    threads = {"OMP_NUM_THREADS": str(len(cores[0]) if cores else torch.get_num_threads())}
    return threads | cpu_memory_environment(cfg.cluster.cpu_keep_memory, on_gpu=torch.cuda.is_available())


def _device_capability() -> tuple[int, int] | None:
    """The driver's GPU architecture, taken as the cluster's (the GPU scripts run one GPU type per job)."""
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def build_policy(cfg: MasterConfig, cluster: Placement | None) -> PolicyBackend:
    model_dir = resolve_model_dir(cfg.policy.model_name, cfg.policy.model_revision)
    tokenizer = cfg.policy.tokenizer and str(resolve_model_dir(cfg.policy.tokenizer, key="policy.tokenizer"))
    # workers get directories: they never look anything up on the hub (the preflight fetched it on this node)
    policy = cfg.policy.model_copy(update={"model_name": str(model_dir), "model_revision": None, "tokenizer": tokenizer})
    match policy.backend:
        case "hf":
            from cipo_nemo.models.policy.hf_policy import HFPolicy

            return HFPolicy(policy=policy, num_steps=cfg.max_optimizer_steps(), seed=cfg.run.seed)
        case "megatron":
            from cipo_nemo.models.policy.megatron_policy import MegatronPolicy
            from cipo_nemo.models.policy.megatron_setup import fp8_process_environment

            fp8_env = fp8_process_environment(policy.megatron, device_capability=_device_capability())
            cores = cluster.policy_cores if cluster else None
            return MegatronPolicy(policy=policy, cluster=cluster and cluster.policy, num_steps=cfg.max_optimizer_steps(),
                                  seed=cfg.run.seed, resource_fraction=_colocated_fraction(cfg),
                                  env_vars=_worker_env(cfg, cores) | fp8_env, node_cores=cores)
        case _:
            raise ValueError(f"policy.backend: unknown backend {policy.backend!r}")


def build_generation(cfg: MasterConfig, cluster: Placement | None) -> GenerationBackend:
    model_dir = resolve_model_dir(cfg.policy.model_name, cfg.policy.model_revision)
    max_model_len = cfg.policy.max_total_sequence_length
    match cfg.generation.backend:
        case "hf":
            from cipo_nemo.models.generation import build_generation_backend

            return build_generation_backend(model_dir=model_dir, generation=cfg.generation,
                                            max_model_len=max_model_len, seed=cfg.run.seed)
        case "vllm":
            from cipo_nemo.models.generation.ray_generation import RayGeneration

            cores = cluster.generation_cores if cluster else None
            return RayGeneration(cluster=cluster and cluster.generation, model_dir=model_dir,
                                 generation=cfg.generation, max_model_len=max_model_len, seed=cfg.run.seed,
                                 resource_fraction=_colocated_fraction(cfg), env_vars=_worker_env(cfg, cores),
                                 node_cores=cores)
        case _:
            raise ValueError(f"generation.backend: unknown backend {cfg.generation.backend!r}")
