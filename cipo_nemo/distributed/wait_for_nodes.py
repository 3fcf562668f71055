"""Wait until every node of a Slurm allocation has joined the Ray cluster with all its CPUs and GPUs.

`python -m cipo_nemo.distributed.wait_for_nodes --address HEAD:PORT --nodes n1,n2 --cpus-per-node 32
--gpus-per-node 8 --timeout-s 600`, run by slurm/ray_on_slurm.sh before the driver starts: the driver places its
workers once, so a node that joins late would leave it short. Each Ray node is started with the label
`slurm_node=<Slurm node name>` (the launcher does that), which is how nodes are matched here; on timeout the
message names the nodes that are missing or short of resources, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import sys
import time

NODE_LABEL = "slurm_node"


def node_shortfalls(
    ray_nodes: list[dict], *, expected: list[str], cpus_per_node: float, gpus_per_node: float
) -> dict[str, str]:
    """Slurm node name -> what is wrong with it ('not registered' or 'has 4 CPU, needs 8'); empty when all ready."""
    registered = {
        node.get("Labels", {}).get(NODE_LABEL): node["Resources"] for node in ray_nodes if node["Alive"]
    }
    problems = {}
    for name in expected:
        if name not in registered:
            problems[name] = "not registered"
            continue
        have_cpu, have_gpu = registered[name].get("CPU", 0.0), registered[name].get("GPU", 0.0)
        if have_cpu < cpus_per_node or have_gpu < gpus_per_node:
            problems[name] = f"has {have_cpu:g} CPU / {have_gpu:g} GPU, needs {cpus_per_node:g} / {gpus_per_node:g}"
    return problems


def wait_for_nodes(
    *, address: str, expected: list[str], cpus_per_node: float, gpus_per_node: float, timeout_s: float
) -> dict[str, str]:
    """Poll Ray until every expected node is ready or the timeout passes; returns the remaining problems."""
    import ray

    ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            problems = node_shortfalls(ray.nodes(), expected=expected, cpus_per_node=cpus_per_node,
                                       gpus_per_node=gpus_per_node)
            if not problems or time.monotonic() > deadline:
                return problems
            time.sleep(1.0)
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cipo_nemo.distributed.wait_for_nodes", description=__doc__)
    parser.add_argument("--address", required=True, help="Ray head, host:port")
    parser.add_argument("--nodes", required=True, help="comma-separated Slurm node names")
    parser.add_argument("--cpus-per-node", type=float, required=True)
    parser.add_argument("--gpus-per-node", type=float, required=True)
    parser.add_argument("--timeout-s", type=float, required=True)
    args = parser.parse_args(argv)
    expected = [name for name in args.nodes.split(",") if name]
    started = time.monotonic()
    problems = wait_for_nodes(address=args.address, expected=expected, cpus_per_node=args.cpus_per_node,
                              gpus_per_node=args.gpus_per_node, timeout_s=args.timeout_s)
    if problems:
        details = "; ".join(f"{name}: {why}" for name, why in problems.items())
        print(f"Ray cluster incomplete after {args.timeout_s:.0f} s: {len(problems)} of {len(expected)} node(s) "
              f"missing or short ({details}); see the ray-worker-<node>.log files", file=sys.stderr)
        return 1
    print(f"Ray cluster ready: {len(expected)} node(s) x {args.cpus_per_node:g} CPU / {args.gpus_per_node:g} GPU "
          f"after {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
