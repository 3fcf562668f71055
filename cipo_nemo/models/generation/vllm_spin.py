"""A short busy-wait in the vLLM worker's shared-memory queue on CPU (docs/notes/megatron_train_speed.md).

vLLM's worker process reads each message of its engine from a shared-memory ring (vllm 0.32
distributed/device_communicators/shm_broadcast.py) and, after each read, busy-waits for the next one for
`SpinCondition.busy_loop_s` (1 s; no setting or environment variable) with `sched_yield` before it blocks on a
socket. In the colocated loop on a CPU machine the policy trains right after the rollout's last message, so for up
to that second the spinning worker competes with torch's threads for the 2 cores: measured, 0.05-0.5 CPU seconds of
the worker during the train step (0.03-0.09 s with the cap), the step itself at most ~0.2 s slower, within noise.
On CPU the spin is capped at `CPU_SPIN_S`; the rollout was not slower with the cap.

The patch runs only in the engine's worker processes: they import this package's worker extension
(`worker_extension_cls`) in `WorkerProc.__init__` before they create their message queues (v1/executor/
multiproc_executor.py), and `limit_spin_from_environment` is called at that import; `SPIN_ENV` is set only in the
environment the engine's processes inherit, on CPU (vllm_generation.build_engine_environment). On GPU nothing is
changed: there generation and training do not share cores.
"""

from __future__ import annotations

import functools
import os
from typing import Any

SPIN_ENV = "CIPO_VLLM_SHM_SPIN_S"
# Within a rollout the next engine message comes a few ms after the worker's reply, so a short spin keeps vLLM's
# fast path there; after the rollout's last message it ends before the policy's step has got going.
CPU_SPIN_S = 0.05


def limit_spin_from_environment() -> float | None:
    """Cap the busy-wait of shared-memory queue readers created from now on at `SPIN_ENV` seconds, when set;
    returns the cap (None: unset, vLLM's default stays)."""
    value = os.environ.get(SPIN_ENV)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{SPIN_ENV}={value!r} is not a number of seconds") from None
    if seconds < 0:
        raise ValueError(f"{SPIN_ENV}={value!r} must be >= 0 seconds")
    limit_reader_spin(seconds)
    return seconds


def limit_reader_spin(seconds: float) -> None:
    """Readers (`SpinCondition(is_reader=True, ...)`) created after this call spin at most `seconds` after a
    read. Idempotent: a second call replaces the cap instead of wrapping twice."""
    from vllm.distributed.device_communicators import shm_broadcast

    condition = shm_broadcast.SpinCondition
    original = getattr(condition.__init__, "__wrapped__", condition.__init__)

    @functools.wraps(original)
    def capped_init(self: Any, *args: Any, busy_loop_s: float = 1.0, **kwargs: Any) -> None:
        original(self, *args, busy_loop_s=min(busy_loop_s, seconds), **kwargs)

    condition.__init__ = capped_init
