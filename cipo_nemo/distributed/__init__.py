"""Ray virtual cluster (placement groups) and worker groups (one actor per bundle, one torch.distributed world)."""

from cipo_nemo.distributed.cluster import ClusterResourceError, VirtualCluster, init_ray
from cipo_nemo.distributed.worker_group import (
    WorkerCalls,
    WorkerDiedError,
    WorkerError,
    WorkerGroup,
    WorkerPlacement,
    WorkerTimeoutError,
)

__all__ = [
    "ClusterResourceError",
    "VirtualCluster",
    "WorkerCalls",
    "WorkerDiedError",
    "WorkerError",
    "WorkerGroup",
    "WorkerPlacement",
    "WorkerTimeoutError",
    "init_ray",
]
