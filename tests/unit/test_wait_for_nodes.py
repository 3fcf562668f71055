"""Matching Ray nodes to the Slurm allocation: which nodes are missing or short, by their slurm_node label; and a
worker node waiting for the head before it joins."""

import socket
import threading
import time

from cipo_nemo.distributed.wait_for_head import main as wait_for_head_main
from cipo_nemo.distributed.wait_for_head import wait_for_port
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


# ----- a worker node waiting for the head's GCS port (slurm/ray_worker.sh)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_worker_waits_for_a_head_that_comes_up_late():
    port = _free_port()
    server = socket.socket()

    def start_head_later():
        time.sleep(0.6)
        server.bind(("127.0.0.1", port))
        server.listen()

    thread = threading.Thread(target=start_head_later)
    thread.start()
    try:
        reached, attempts = wait_for_port("127.0.0.1", port, timeout_s=10, retry_every_s=0.2)
    finally:
        thread.join()
        server.close()
    assert reached and attempts >= 2  # refused at first, then retried until the head listened


def test_worker_gives_up_after_the_timeout_naming_the_head(capsys):
    port = _free_port()
    started = time.monotonic()
    assert wait_for_head_main(["--address", f"127.0.0.1:{port}", "--timeout-s", "0.5", "--retry-every-s", "0.1"]) == 1
    assert time.monotonic() - started < 5
    assert f"the Ray head at 127.0.0.1:{port} did not answer within 0.5 s" in capsys.readouterr().err
