"""GPU placement of worker groups, on Ray's fake GPUs (no GPU needed).

`ray.init(num_gpus=4)` on a CPU machine schedules four GPUs that do not exist: actors asking for GPU shares get
distinct GPU ids and Ray sets `CUDA_VISIBLE_DEVICES` for each, exactly as on a GPU node. What this checks is the
environment every actor gets, which decides the device a program in it opens as `cuda:0`.
"""

import os
import sys

import pytest
import ray

from cipo_nemo.distributed import VirtualCluster, WorkerGroup
from cipo_nemo.distributed.cluster import _short_temp_dir
from cipo_nemo.distributed.worker_group import _WorkerHost, build_rank_envs

pytestmark = pytest.mark.slow  # Ray

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class DeviceProbe:
    def __init__(self) -> None:
        pass

    def devices(self) -> dict:
        return {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"), "LOCAL_RANK": os.environ["LOCAL_RANK"],
                "ray_gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()]}


@pytest.fixture(scope="module")
def fake_gpu_cluster():
    ray.init(address="local", num_cpus=4, num_gpus=4, include_dashboard=False, _temp_dir=_short_temp_dir())
    cluster = VirtualCluster(num_nodes=1, devices_per_node=2, use_gpus=True, cpus_per_bundle=1, ready_timeout_s=60)
    yield cluster
    cluster.shutdown()
    ray.shutdown()


def test_engines_without_torch_distributed_each_see_only_their_own_gpu(fake_gpu_cluster):
    """Two TP=1 vLLM engines on one node: each must open a different GPU as cuda:0 (before the fix both saw
    "0,1" and vLLM's uniprocess executor put both on the first)."""
    with WorkerGroup(fake_gpu_cluster, DeviceProbe, name="generation", init_kwargs={}, resource_fraction=0.5,
                     torch_distributed=False) as engines:
        seen = engines.run_all("devices", timeout_s=60)
    assert [device["CUDA_VISIBLE_DEVICES"] for device in seen] == [device["ray_gpu_ids"][0] for device in seen]
    assert len({device["CUDA_VISIBLE_DEVICES"] for device in seen}) == 2
    assert all(len(device["CUDA_VISIBLE_DEVICES"].split(",")) == 1 for device in seen)
    assert [device["LOCAL_RANK"] for device in seen] == ["0", "0"]


def test_torch_distributed_group_sees_all_node_gpus_and_colocates_with_engines(fake_gpu_cluster):
    """The policy group (NCCL cannot start here, so its environment is built from its real actors' node info) widens
    the list to the node's GPUs; rank r's LOCAL_RANK points at the same GPU the engine on bundle r holds."""
    host_actor = ray.remote(_WorkerHost)
    hosts = [
        host_actor.options(num_cpus=0.5, num_gpus=0.5, scheduling_strategy=ray.util.scheduling_strategies
                           .PlacementGroupSchedulingStrategy(placement_group=group,
                                                             placement_group_bundle_index=index)).remote()
        for group, index in fake_gpu_cluster.bundles()
    ]
    try:
        infos = ray.get([host.node_info.remote() for host in hosts], timeout=60)
        with WorkerGroup(fake_gpu_cluster, DeviceProbe, name="generation", init_kwargs={}, resource_fraction=0.5,
                         torch_distributed=False) as engines:
            engine_gpus = [device["CUDA_VISIBLE_DEVICES"] for device in engines.run_all("devices", timeout_s=60)]
    finally:
        for host in hosts:
            ray.kill(host)
    envs = build_rank_envs(infos, use_gpus=True, share_node_gpus=True, master_port=29500)
    node_gpus = sorted(gpu for info in infos for gpu in info["gpu_ids"])
    assert [env["CUDA_VISIBLE_DEVICES"] for env in envs] == [",".join(node_gpus)] * 2
    policy_gpus = [env["CUDA_VISIBLE_DEVICES"].split(",")[int(env["LOCAL_RANK"])] for env in envs]
    assert policy_gpus == engine_gpus  # colocated: policy rank r and the engine on bundle r share one GPU


class ImportTimeEnvironment:
    """Records, when the worker is built (where the policy worker first imports Transformer Engine), the FP8
    variable the policy group's runtime environment must have set at process start."""

    def __init__(self) -> None:
        self.value = os.environ.get("NVTE_FP8_BLOCK_SCALING_FP32_SCALES")

    def seen(self) -> str | None:
        return self.value


def test_policy_runtime_environment_reaches_actors_before_the_worker_imports(fake_gpu_cluster):
    from pathlib import Path

    from cipo_nemo.config import load_config
    from cipo_nemo.models.policy.megatron_setup import fp8_process_environment

    base = Path(__file__).resolve().parents[2] / "conf" / "cipo_base.yaml"
    megatron = load_config(base, ["policy.megatron.layer_spec=transformer_engine", "policy.megatron.fp8=e4m3",
                                  "policy.megatron.fp8_recipe=blockwise"]).policy.megatron
    env_vars = fp8_process_environment(megatron, device_capability=(9, 0))
    with WorkerGroup(fake_gpu_cluster, ImportTimeEnvironment, name="policy-env", init_kwargs={},
                     resource_fraction=0.5, env_vars=env_vars, torch_distributed=False) as group:
        assert group.run_all("seen", timeout_s=60) == ["1", "1"]
