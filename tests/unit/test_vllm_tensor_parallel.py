"""vLLM tensor parallelism: the engine layout over bundles and the GPU path's engine arguments and environment.

The GPU path (vLLM's Ray executor inside the node's placement group) cannot run on this CPU machine; these check
what it is given, and that every variable it sets exists in the installed vLLM.
"""

import pytest
import vllm.envs

from cipo_nemo.config.schema import VllmConfig
from cipo_nemo.models.generation.ray_generation import EngineLayout, build_engine_environments
from cipo_nemo.models.generation.vllm_generation import build_engine_kwargs


def vllm_config(tensor_parallel: int) -> VllmConfig:
    return VllmConfig(tensor_parallel=tensor_parallel, gpu_memory_utilization=0.6, cpu_kv_cache_gib=1, dtype="auto",
                      quantization=None, enforce_eager=True, max_num_batched_tokens=None)


def test_70b_layout_one_tp8_engine_per_node():
    layout = EngineLayout(num_nodes=8, devices_per_node=8, tensor_parallel=8)
    assert layout.num_engines == 8
    assert layout.engine_ranks() == [0, 8, 16, 24, 32, 40, 48, 56]
    assert all(layout.bundle_indices(engine) == list(range(8)) for engine in range(8))
    assert layout.engine_of_rank() == [rank // 8 for rank in range(64)]


def test_several_engines_per_node_use_disjoint_bundles_of_their_node():
    layout = EngineLayout(num_nodes=2, devices_per_node=8, tensor_parallel=4)
    assert layout.engine_ranks() == [0, 4, 8, 12]
    # Engine 2 is the first engine of node 1: bundle indices restart in node 1's placement group.
    assert [layout.bundle_indices(engine) for engine in range(4)] == [[0, 1, 2, 3], [4, 5, 6, 7]] * 2


def test_engine_may_not_span_nodes():
    with pytest.raises(ValueError, match=r"generation\.vllm\.tensor_parallel \(3\) does not divide "
                                         r"cluster\.devices_per_node \(8\)"):
        EngineLayout(num_nodes=2, devices_per_node=8, tensor_parallel=3)
    with pytest.raises(ValueError, match=r"tensor_parallel \(16\) does not divide cluster\.devices_per_node \(8\)"):
        EngineLayout(num_nodes=2, devices_per_node=8, tensor_parallel=16)


def test_gpu_engine_actors_get_ray_executor_environment_with_colocated_gpu_share():
    layout = EngineLayout(num_nodes=1, devices_per_node=4, tensor_parallel=2)
    environments = build_engine_environments(layout, use_gpus=True, resource_fraction=0.5)
    ray_tp = {"VLLM_RAY_PER_WORKER_GPUS": "0.5", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    assert environments == [ray_tp | {"VLLM_RAY_BUNDLE_INDICES": "0,1"}, None,
                            ray_tp | {"VLLM_RAY_BUNDLE_INDICES": "2,3"}, None]
    for name in environments[0]:
        assert name in vllm.envs.environment_variables, f"{name} is not a variable of the installed vLLM"
    # The values parse as vLLM parses them.
    assert float(environments[0]["VLLM_RAY_PER_WORKER_GPUS"]) == 0.5
    assert list(map(int, environments[2]["VLLM_RAY_BUNDLE_INDICES"].split(","))) == [2, 3]


def test_cpu_and_tp1_engines_need_no_ray_executor_environment():
    tp2 = EngineLayout(num_nodes=1, devices_per_node=4, tensor_parallel=2)
    assert build_engine_environments(tp2, use_gpus=False, resource_fraction=0.5) == [{}, None, {}, None]
    tp1 = EngineLayout(num_nodes=1, devices_per_node=2, tensor_parallel=1)
    assert build_engine_environments(tp1, use_gpus=True, resource_fraction=0.5) == [{}, {}]


@pytest.mark.parametrize(("tensor_parallel", "on_gpu", "executor"), [(8, True, "ray"), (2, False, "mp"),
                                                                     (1, True, None), (1, False, None)])
def test_engine_kwargs_pick_the_tensor_parallel_executor(tensor_parallel, on_gpu, executor):
    kwargs = build_engine_kwargs(model_dir="/m", vllm=vllm_config(tensor_parallel), colocated=True, max_model_len=64,
                                 seed=0, on_gpu=on_gpu)
    assert kwargs["tensor_parallel_size"] == tensor_parallel
    if executor is None:  # vLLM's own default at TP 1
        assert "distributed_executor_backend" not in kwargs
    else:
        assert kwargs["distributed_executor_backend"] == executor
