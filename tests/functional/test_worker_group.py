"""Ray virtual cluster + worker groups on one local Ray (4 logical CPUs on this 2-core machine).

One module-scoped Ray and one 2-bundle cluster; the main 'policy' group takes half of each bundle, so the other
groups (colocated, failing, shut down) fit beside it one at a time.
"""

import os
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
import torch
import torch.distributed as dist

from cipo_nemo.distributed import (
    ClusterResourceError,
    VirtualCluster,
    WorkerDiedError,
    WorkerError,
    WorkerGroup,
    WorkerTimeoutError,
    init_ray,
)
from cipo_nemo.distributed.worker_group import build_rank_envs

pytestmark = pytest.mark.slow  # Ray

# Ray's workers cannot import this test module by name: ship the worker classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

RAY_CPUS = 4


class ProbeWorker:
    def __init__(self, *, tag: str, marker_dir: str | None = None) -> None:
        self.tag = tag
        self.rank = int(os.environ["RANK"])
        self.marker_dir = marker_dir

    def environment(self) -> dict:
        keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        seen = {key: os.environ[key] for key in keys}
        seen["dist_rank"] = dist.get_rank() if dist.is_initialized() else None
        seen["dist_world_size"] = dist.get_world_size() if dist.is_initialized() else None
        seen["backend"] = dist.get_backend() if dist.is_initialized() else None
        return seen

    def all_reduce_rank_tensor(self) -> list[float]:
        tensor = torch.tensor([self.rank + 1.0, 10.0 * (self.rank + 1)])
        dist.all_reduce(tensor)
        return tensor.tolist()

    def echo(self, shard, *, scale: int = 1) -> dict:
        return {"rank": self.rank, "tag": self.tag, "shard": shard, "scale": scale}

    def fail_on(self, rank: int) -> str:
        if self.rank == rank:
            raise ValueError("boom")
        return "fine"

    def exit_on(self, rank: int, code: int) -> str:
        if self.rank == rank:
            os._exit(code)
        return "alive"

    def exit_on_after_peer_fails(self, rank: int) -> str:
        """Rank `rank` dies 0.5 s after its peers failed with what gloo raises when a peer's connection closes (the
        order of a real death in a collective when Ray notices the death last)."""
        if self.rank == rank:
            time.sleep(0.5)
            os._exit(9)
        raise RuntimeError("[gloo] Connection closed by peer")

    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def pid(self) -> int:
        return os.getpid()

    def thread_cores(self) -> dict:
        """Cpus_allowed_list of every thread of this process (after starting a new one), and torch's threads."""
        started = threading.Thread(target=time.sleep, args=(1.0,))
        started.start()
        cores = {}
        for task in Path("/proc/self/task").iterdir():
            try:
                status = (task / "status").read_text()
            except OSError:  # a thread that ended meanwhile
                continue
            cores[int(task.name)] = next(line.split()[1] for line in status.splitlines()
                                         if line.startswith("Cpus_allowed_list"))
        started.join()
        return {"cores": cores, "torch_threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS")}

    def placement_group_ids(self) -> tuple[str | None, str | None]:
        """Hex ids of this actor's current placement group and of that of a zero-CPU task it starts."""

        @ray.remote(num_cpus=0)
        def child() -> str | None:
            group = ray.util.get_current_placement_group()
            return None if group is None else group.id.hex()

        group = ray.util.get_current_placement_group()
        return (None if group is None else group.id.hex()), ray.get(child.remote())

    def shutdown(self) -> None:
        if self.marker_dir is not None:
            Path(self.marker_dir, f"{self.tag}-rank{self.rank}").write_text("closed")


class BrokenInitWorker:
    def __init__(self) -> None:
        if os.environ["RANK"] == "1":
            raise ValueError("cannot load the model on rank 1")


@pytest.fixture(scope="module")
def local_ray():
    init_ray(address=None, num_cpus=RAY_CPUS)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def cluster(local_ray):
    virtual_cluster = VirtualCluster(num_nodes=1, devices_per_node=2, use_gpus=False, ready_timeout_s=60)
    yield virtual_cluster
    virtual_cluster.shutdown()


@pytest.fixture(scope="module")
def policy_group(cluster):
    group = WorkerGroup(cluster, ProbeWorker, name="policy", init_kwargs={"tag": "policy"}, resource_fraction=0.5)
    yield group
    group.shutdown()


def start_side_group(cluster, name: str, **overrides) -> WorkerGroup:
    """A second group on the same bundles (the other half of each bundle)."""
    options = dict(init_kwargs={"tag": name}, resource_fraction=0.5, torch_distributed=False)
    options.update(overrides)
    return WorkerGroup(cluster, ProbeWorker, name=name, **options)


def test_two_workers_form_one_gloo_world(policy_group):
    # rank r contributes [r + 1, 10 (r + 1)]: the sum over ranks 0 and 1 is [1 + 2, 10 + 20].
    assert policy_group.run_all("all_reduce_rank_tensor", timeout_s=60) == [[3.0, 30.0], [3.0, 30.0]]
    environments = policy_group.run_all("environment", timeout_s=60)
    for rank, seen in enumerate(environments):
        assert (seen["RANK"], seen["WORLD_SIZE"], seen["LOCAL_RANK"], seen["LOCAL_WORLD_SIZE"]) == (
            str(rank), "2", str(rank), "2"
        )
        assert (seen["dist_rank"], seen["dist_world_size"], seen["backend"]) == (rank, 2, "gloo")
    assert environments[0]["MASTER_ADDR"] == environments[1]["MASTER_ADDR"]
    assert environments[0]["MASTER_PORT"] == environments[1]["MASTER_PORT"]
    assert policy_group.run_on(1, "echo", "x", scale=3, timeout_s=60) == {
        "rank": 1, "tag": "policy", "shard": "x", "scale": 3
    }


def test_run_sharded_by_data_parallel_rank(policy_group):
    split = policy_group.run_sharded("echo", ["first half", "second half"], dp_rank_of=[0, 1], scale=2, timeout_s=60)
    assert [(out["rank"], out["shard"], out["scale"]) for out in split] == [(0, "first half", 2), (1, "second half", 2)]
    # TP-like replication: both ranks belong to data-parallel group 0 and get the same shard.
    replicated = policy_group.run_sharded("echo", [[1, 2, 3]], dp_rank_of=[0, 0], timeout_s=60)
    assert [(out["rank"], out["shard"]) for out in replicated] == [(0, [1, 2, 3]), (1, [1, 2, 3])]
    with pytest.raises(ValueError, match="must use every shard index 0..1"):
        policy_group.run_sharded("echo", ["a", "b"], dp_rank_of=[0, 0])


def test_method_error_names_group_rank_method_and_traceback(policy_group):
    with pytest.raises(WorkerError) as caught:
        policy_group.run_all("fail_on", 1, timeout_s=60)
    error = caught.value
    assert (error.group, error.rank, error.method) == ("policy", 1, "fail_on")
    assert "worker group 'policy' rank 1" in str(error) and "failed in fail_on: ValueError: boom" in str(error)
    assert "bundle 1" in str(error)
    assert 'raise ValueError("boom")' in error.remote_traceback and "ValueError: boom" in error.remote_traceback
    assert error.__cause__ is None and error.__suppress_context__
    # The group stays usable after a method error.
    assert policy_group.run_all("fail_on", 5, timeout_s=60) == ["fine", "fine"]


def test_dead_worker_and_slow_call_raise_instead_of_hanging(cluster):
    group = start_side_group(cluster, "crashy")
    try:
        with pytest.raises(WorkerTimeoutError, match=r"no result within 0.5 s from ranks \[0, 1\]"):
            group.run_all("sleep", 3.0, timeout_s=0.5)
        with pytest.raises(WorkerDiedError) as caught:
            # The call queues behind the sleeps; rank 1 then exits with status 3. A hang would end as a timeout.
            group.run_all("exit_on", 1, 3, timeout_s=60)
        assert (caught.value.group, caught.value.rank, caught.value.method) == ("crashy", 1, "exit_on")
        assert "the actor died" in str(caught.value)
    finally:
        group.shutdown()  # rank 1 is already dead: skipped with a warning, not an error
    assert group.shutdown() is None  # idempotent


def test_a_rank_dying_in_a_collective_is_reported_as_its_death(cluster):
    group = start_side_group(cluster, "collective")
    try:
        with pytest.raises(WorkerDiedError) as caught:  # the cause, not rank 0's error about the closed connection
            group.run_all("exit_on_after_peer_fails", 1, timeout_s=60)
        assert (caught.value.rank, caught.value.method) == (1, "exit_on_after_peer_fails")
    finally:
        group.shutdown()


def test_constructor_failure_surfaces_at_group_start(cluster):
    with pytest.raises(WorkerError) as caught:
        WorkerGroup(
            cluster, BrokenInitWorker, name="broken", init_kwargs={}, resource_fraction=0.5, torch_distributed=False
        )
    error = caught.value
    assert (error.group, error.rank, error.method) == ("broken", 1, "BrokenInitWorker.__init__")
    assert "ValueError: cannot load the model on rank 1" in str(error)
    assert 'raise ValueError("cannot load the model on rank 1")' in error.remote_traceback


def test_colocated_groups_share_bundles(cluster, policy_group):
    generation = start_side_group(cluster, "generation", torch_distributed=True)
    try:
        # Both groups hold half of each bundle and run at the same time, each in its own gloo world.
        policy_calls = policy_group.run_all_async("all_reduce_rank_tensor")
        generation_calls = generation.run_all_async("all_reduce_rank_tensor")
        assert generation_calls.get(timeout_s=60) == [[3.0, 30.0], [3.0, 30.0]]
        assert policy_calls.get(timeout_s=60) == [[3.0, 30.0], [3.0, 30.0]]
        assert [p.bundle_index for p in generation.placements] == [p.bundle_index for p in policy_group.placements]
        policy_port = policy_group.run_on(0, "environment", timeout_s=60)["MASTER_PORT"]
        assert generation.run_on(0, "environment", timeout_s=60)["MASTER_PORT"] != policy_port
        # The bundles are now full: a third half-bundle group cannot be placed and says so.
        with pytest.raises(WorkerTimeoutError, match="lack the free resources"):
            start_side_group(cluster, "third", placement_timeout_s=3)
    finally:
        generation.shutdown()


def test_capture_child_tasks_exposes_the_node_placement_group(cluster, policy_group):
    """What vLLM's Ray executor relies on inside an engine actor: get_current_placement_group() is the node's group,
    and (only with capture_child_tasks) tasks the actor starts without a strategy land in it too."""
    node_group = cluster.bundles()[0][0].id.hex()
    with start_side_group(cluster, "capturing", capture_child_tasks=True, actor_gpus=False) as group:
        assert group.run_all("placement_group_ids", timeout_s=60) == [(node_group, node_group)] * 2
    with start_side_group(cluster, "plain") as group:
        assert group.run_all("placement_group_ids", timeout_s=60) == [(node_group, None)] * 2


def test_cluster_that_does_not_fit_fails_clearly(cluster):
    with pytest.raises(ClusterResourceError, match=r"1 node\(s\) x 8 CPU bundles .*\(per node: 4 CPU\)"):
        VirtualCluster(num_nodes=1, devices_per_node=8, use_gpus=False, ready_timeout_s=5)
    # 3 bundles fit Ray's 4 CPUs, but the module's cluster already holds 2 of them.
    with pytest.raises(ClusterResourceError, match="not placed within 2 s; Ray has 2 CPU available of 4 CPU"):
        VirtualCluster(num_nodes=1, devices_per_node=3, use_gpus=False, ready_timeout_s=2)
    assert ray.available_resources()["CPU"] == pytest.approx(2.0)  # the pending group was removed


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to give each rank its own")
def test_node_cores_bind_every_thread_of_each_rank(cluster):
    """generation.colocated false on a CPU: each rank's process, with every thread it had and starts later, runs
    on its own cores only, and torch uses that many threads (distributed/cpu_binding.py)."""
    first, second = sorted(os.sched_getaffinity(0))[:2]
    group = WorkerGroup(cluster, ProbeWorker, name="bound", init_kwargs={"tag": "bound"}, resource_fraction=0.5,
                        torch_distributed=False, node_cores=[[first], [second]])
    try:
        for rank, seen in enumerate(group.run_all("thread_cores", timeout_s=60)):
            assert len(seen["cores"]) > 1  # Ray's own threads, the worker's, and the one started just now
            assert set(seen["cores"].values()) == {str((first, second)[rank])}, seen
            assert seen["torch_threads"] == 1 and seen["omp"] == "1"
    finally:
        group.shutdown()


def test_shutdown_calls_worker_shutdown_and_kills_actors(cluster, tmp_path):
    group = start_side_group(cluster, "closing", init_kwargs={"tag": "closing", "marker_dir": str(tmp_path)})
    pids = group.run_all("pid", timeout_s=60)
    assert [p.pid for p in group.placements] == pids
    group.shutdown()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["closing-rank0", "closing-rank1"]
    assert all(wait_until_gone(pid, timeout_s=30) for pid in pids)
    with pytest.raises(RuntimeError, match="'closing' was shut down"):
        group.run_all("pid")


def wait_until_gone(pid: int, *, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def test_rank_envs_share_node_gpus_for_nccl():
    """GPU placement arithmetic (no GPU needed): 3 ranks on node a (GPUs 3, 1, 2), 1 rank on node b (GPU 0)."""
    infos = [
        {"node_id": "a", "node_ip": "10.0.0.1", "gpu_ids": ["3"]},
        {"node_id": "a", "node_ip": "10.0.0.1", "gpu_ids": ["1"]},
        {"node_id": "b", "node_ip": "10.0.0.2", "gpu_ids": ["0"]},
        {"node_id": "a", "node_ip": "10.0.0.1", "gpu_ids": ["2"]},
    ]
    envs = build_rank_envs(infos, use_gpus=True, share_node_gpus=True, master_port=29500)
    assert [env["CUDA_VISIBLE_DEVICES"] for env in envs] == ["1,2,3", "1,2,3", "0", "1,2,3"]
    assert [env["LOCAL_RANK"] for env in envs] == ["2", "0", "0", "1"]
    assert [env["LOCAL_WORLD_SIZE"] for env in envs] == ["3", "3", "1", "3"]
    assert {env["MASTER_ADDR"] for env in envs} == {"10.0.0.1"} and {env["WORLD_SIZE"] for env in envs} == {"4"}
