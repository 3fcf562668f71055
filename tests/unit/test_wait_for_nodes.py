"""Matching Ray nodes to the Slurm allocation: which nodes are missing or short, by their slurm_node label."""

from cipo_nemo.distributed.wait_for_nodes import node_shortfalls


def _node(name, cpu, gpu=0.0, alive=True):
    resources = {"CPU": cpu, **({"GPU": gpu} if gpu else {})}
    return {"Alive": alive, "Labels": {"slurm_node": name}, "Resources": resources}


def test_all_nodes_ready():
    nodes = [_node("a", 32, 8), _node("b", 32, 8)]
    assert node_shortfalls(nodes, expected=["a", "b"], cpus_per_node=32, gpus_per_node=8) == {}


def test_missing_dead_and_short_nodes_are_named():
    nodes = [_node("a", 32, 8), _node("b", 32, 4), _node("c", 32, 8, alive=False), _node("x", 32, 8)]
    problems = node_shortfalls(nodes, expected=["a", "b", "c", "d"], cpus_per_node=32, gpus_per_node=8)
    assert problems == {"b": "has 32 CPU / 4 GPU, needs 32 / 8", "c": "not registered", "d": "not registered"}


def test_cpu_only_nodes():
    assert node_shortfalls([_node("a", 2)], expected=["a"], cpus_per_node=2, gpus_per_node=0) == {}
    assert node_shortfalls([_node("a", 1)], expected=["a"], cpus_per_node=2, gpus_per_node=0) == {
        "a": "has 1 CPU / 0 GPU, needs 2 / 0"}
