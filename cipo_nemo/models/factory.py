"""Build the tokenizer, the Ray cluster, the policy and the generation backend from the config.

Placement (docs/design.md "Architecture"): with `policy.backend: megatron` the policy is a worker group of
`cluster.num_nodes x cluster.devices_per_node` ranks; a vLLM generation group sits on the same bundles when
`generation.colocated` (each group takes half of every bundle, NeMo-RL's colocation by fractional resources).
The HF backends run in the controller process: small models, tests, and the reference implementation.
"""

from __future__ import annotations

import logging
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


def build_cluster(cfg: MasterConfig) -> Any:
    """A Ray virtual cluster (Ray started in-process unless cluster.ray_address names a running one)."""
    from cipo_nemo.distributed import VirtualCluster, init_ray

    init_ray(address=cfg.cluster.ray_address)
    return VirtualCluster(num_nodes=cfg.cluster.num_nodes, devices_per_node=cfg.cluster.devices_per_node,
                          use_gpus=torch.cuda.is_available())


def _colocated_fraction(cfg: MasterConfig) -> float:
    both_on_ray = cfg.policy.backend == "megatron" and cfg.generation.backend == "vllm"
    return 0.5 if both_on_ray and cfg.generation.colocated else 1.0


def _worker_env(cfg: MasterConfig) -> dict[str, str]:
    # Ray pins actors to OMP_NUM_THREADS=1; the phases alternate (generate, then train), so each may use the node.
    threads = {"OMP_NUM_THREADS": str(torch.get_num_threads())}
    return threads | cpu_memory_environment(cfg.cluster.cpu_keep_memory, on_gpu=torch.cuda.is_available())


def _device_capability() -> tuple[int, int] | None:
    """The driver's GPU architecture, taken as the cluster's (the GPU scripts run one GPU type per job)."""
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def build_policy(cfg: MasterConfig, cluster: Any) -> PolicyBackend:
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
            return MegatronPolicy(policy=policy, cluster=cluster, num_steps=cfg.max_optimizer_steps(), seed=cfg.run.seed,
                                  resource_fraction=_colocated_fraction(cfg), env_vars=_worker_env(cfg) | fp8_env)
        case _:
            raise ValueError(f"policy.backend: unknown backend {policy.backend!r}")


def build_generation(cfg: MasterConfig, cluster: Any) -> GenerationBackend:
    model_dir = resolve_model_dir(cfg.policy.model_name, cfg.policy.model_revision)
    max_model_len = cfg.policy.max_total_sequence_length
    match cfg.generation.backend:
        case "hf":
            from cipo_nemo.models.generation import build_generation_backend

            return build_generation_backend(model_dir=model_dir, generation=cfg.generation,
                                            max_model_len=max_model_len, seed=cfg.run.seed)
        case "vllm":
            from cipo_nemo.models.generation.ray_generation import RayGeneration

            return RayGeneration(cluster=cluster, model_dir=model_dir, generation=cfg.generation,
                                 max_model_len=max_model_len, seed=cfg.run.seed,
                                 resource_fraction=_colocated_fraction(cfg), env_vars=_worker_env(cfg))
        case _:
            raise ValueError(f"generation.backend: unknown backend {cfg.generation.backend!r}")
