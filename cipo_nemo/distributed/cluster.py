"""Ray start-up and the virtual cluster: placement groups over nodes x devices.

The virtual cluster reserves the devices once; worker groups (``worker_group.py``) then place one actor per
bundle. Colocation (policy and generation on the same devices, as NeMo-RL's default) is two worker groups on the
same ``VirtualCluster``, each asking for a fraction of every bundle.

One machine: ``init_ray(address=None)`` starts Ray inside this process. Slurm: the ``slurm/`` launcher starts a
Ray head and one Ray worker per node, and the driver joins with ``init_ray(address=...)``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

logger = logging.getLogger(__name__)

# Ray's raylet and plasma sockets live under the temp dir and Unix socket paths are limited to 107 bytes.
_MAX_TEMP_BASE_LENGTH = 40


class ClusterResourceError(RuntimeError):
    """The Ray cluster cannot hold the requested placement (names what was asked for and what Ray has)."""


def init_ray(*, address: str | None, num_cpus: int | None = None, log_to_driver: bool = False) -> None:
    """Start an in-process local Ray (``address=None``) or join an existing cluster (``address``).

    Does nothing when Ray is already initialized in this process. ``address="local"`` is passed explicitly for
    the in-process case because a leftover ``/tmp/ray/ray_current_cluster`` otherwise makes ``ray.init`` attach
    to a stale cluster. Worker stdout/stderr stays in the session's log directory unless ``log_to_driver``;
    worker failures reach the driver anyway, with their traceback, through ``WorkerError``.
    """
    if ray.is_initialized():
        logger.info("Ray is already initialized; reusing it")
        return
    if address is None:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=log_to_driver,
            logging_level=logging.WARNING,
            _temp_dir=_short_temp_dir(),
        )
    else:
        if num_cpus is not None:
            raise ValueError(
                f"num_cpus={num_cpus} applies only to an in-process Ray; the cluster at {address!r} "
                "declares its own resources (set them with `ray start --num-cpus` on each node)"
            )
        ray.init(address=address, log_to_driver=log_to_driver, logging_level=logging.WARNING)
    logger.info("Ray resources: %s", ray.cluster_resources())


def _short_temp_dir() -> str:
    base = tempfile.gettempdir()
    if len(base) > _MAX_TEMP_BASE_LENGTH:
        base = "/tmp"
    return os.path.join(base, f"cipo-ray-{os.getuid()}")


class VirtualCluster:
    """Placement groups reserving ``num_nodes x devices_per_node`` bundles, one group per node.

    Bundles are ``{"GPU": 1, "CPU": cpus_per_bundle}`` with GPUs and ``{"CPU": cpus_per_bundle}`` without. Each
    node's group uses STRICT_PACK, so its bundles (the ranks of one node) land on one machine and
    ``LOCAL_RANK`` is the bundle index within the group. On a single-node CPU test cluster STRICT_PACK is the
    same as PACK. Ray may put two groups on one machine when that machine has room for both; ranks are still
    contiguous per group. ``bundles()`` lists (placement group, bundle index) in global rank order.
    """

    def __init__(
        self,
        *,
        num_nodes: int,
        devices_per_node: int,
        use_gpus: bool,
        cpus_per_bundle: float = 1.0,
        ready_timeout_s: float = 60.0,
    ) -> None:
        if num_nodes < 1 or devices_per_node < 1:
            raise ValueError(f"num_nodes ({num_nodes}) and devices_per_node ({devices_per_node}) must be >= 1")
        self.num_nodes = num_nodes
        self.devices_per_node = devices_per_node
        self.use_gpus = use_gpus
        self.bundle_resources: dict[str, float] = (
            {"GPU": 1.0, "CPU": cpus_per_bundle} if use_gpus else {"CPU": cpus_per_bundle}
        )
        check_cluster_can_hold(
            num_nodes=num_nodes, devices_per_node=devices_per_node, bundle_resources=self.bundle_resources
        )
        self._placement_groups: list[PlacementGroup] = [
            placement_group([dict(self.bundle_resources)] * devices_per_node, strategy="STRICT_PACK")
            for _ in range(num_nodes)
        ]
        self._wait_until_placed(ready_timeout_s)

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.devices_per_node

    def bundles(self) -> list[tuple[PlacementGroup, int]]:
        """(placement group, bundle index) for every rank, in rank order (node-major)."""
        return [(group, index) for group in self._placement_groups for index in range(self.devices_per_node)]

    def shutdown(self) -> None:
        """Remove the placement groups (idempotent). Actors still placed on them are killed by Ray."""
        for group in self._placement_groups:
            remove_placement_group(group)
        self._placement_groups = []

    def _wait_until_placed(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for node_index, group in enumerate(self._placement_groups):
            if group.wait(timeout_seconds=max(deadline - time.monotonic(), 0.0)):
                continue
            self.shutdown()
            raise ClusterResourceError(
                f"placement group for node {node_index} ({self.devices_per_node} bundles of "
                f"{self.bundle_resources}) was not placed within {timeout_s:.0f} s; Ray has "
                f"{_format_resources(ray.available_resources())} available of "
                f"{_format_resources(ray.cluster_resources())} (other placement groups or actors may hold the rest)"
            )


def check_cluster_can_hold(*, num_nodes: int, devices_per_node: int, bundle_resources: dict[str, float]) -> None:
    """Fail fast when no placement could ever succeed: too few nodes with room for one node's bundles."""
    node_needs = {name: amount * devices_per_node for name, amount in bundle_resources.items()}
    alive_nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    fitting_nodes = [
        resources
        for resources in alive_nodes
        if all(resources.get(name, 0.0) >= amount for name, amount in node_needs.items())
    ]
    if len(fitting_nodes) >= num_nodes:
        return
    device = "GPU" if "GPU" in bundle_resources else "CPU"
    per_node = ", ".join(f"{resources.get(device, 0.0):g} {device}" for resources in alive_nodes)
    raise ClusterResourceError(
        f"asked for {num_nodes} node(s) x {devices_per_node} {device} bundles ({bundle_resources} each, "
        f"{_format_resources(node_needs)} per node), but only {len(fitting_nodes)} of Ray's {len(alive_nodes)} "
        f"alive node(s) can hold that (per node: {per_node}); lower cluster.devices_per_node / num_nodes or give "
        "Ray more resources (num_cpus, or more nodes)"
    )


def _format_resources(resources: dict[str, float]) -> str:
    shown = {name: amount for name, amount in resources.items() if name in ("CPU", "GPU")}
    return ", ".join(f"{amount:g} {name}" for name, amount in sorted(shown.items())) or "nothing"
