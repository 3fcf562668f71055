"""How a node's cores are split between the policy's ranks and the vLLM engines when they run apart on a CPU."""

import pytest

from cipo_nemo.distributed.cpu_binding import format_cores, parse_cores, split_node_cores


def test_one_core_each_on_the_two_core_machine():
    assert split_node_cores([0, 1], policy_devices=1, generation_devices=1) == ([[0]], [[1]])


def test_equal_shares_and_an_engine_takes_its_tensor_parallel_bundles():
    cores = list(range(8))
    policy, generation = split_node_cores(cores, policy_devices=2, generation_devices=2, engine_tensor_parallel=2)
    assert policy == [[0, 1], [2, 3]]
    # the engine actor on bundle 0 spawns both TP workers: it gets both shares; its peer bundle keeps its own
    assert generation == [[4, 5, 6, 7], [6, 7]]
    # leftover cores (9 over 4 devices) stay unused rather than unequal
    assert split_node_cores(list(range(9)), policy_devices=3, generation_devices=1) == ([[0, 1], [2, 3], [4, 5]],
                                                                                        [[6, 7]])


def test_too_few_cores_names_the_keys():
    with pytest.raises(ValueError, match="cluster.devices_per_node, cluster.generation_devices_per_node"):
        split_node_cores([0, 1], policy_devices=2, generation_devices=1)


def test_cores_round_trip_through_the_environment_variable():
    assert parse_cores(format_cores([3, 5, 7])) == [3, 5, 7]
