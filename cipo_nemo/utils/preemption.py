"""Stopping a run early on purpose: a signal from the scheduler, or a wall-clock limit in the config.

On Slurm the batch script gets SIGUSR1 some minutes before the time limit (`#SBATCH --signal=B:USR1@300`) and the
launcher (slurm/ray_on_slurm.sh) forwards it, or SIGTERM, to the driver. The driver must not die of it (Python's
default action for both is to exit at once, losing the step): the handler here only records the request, and the
training loop finishes the step it is in, writes a checkpoint and ends with `REQUEUE_EXIT_CODE`
(cipo_nemo.trainer). `checkpointing.checkpoint_must_save_by` does the same without a signal: stop when the
next step would likely end after that much time since the driver started.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """What asked the run to stop (None: nothing). Set from a signal handler, read by the training loop."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def request(self, reason: str) -> None:
        if self.reason is None:  # the first reason is the one worth reporting
            self.reason = reason

    def clear(self) -> None:
        self.reason = None


# Signal handlers are process-wide, so the request they set is too: one per driver process.
STOP_REQUEST = StopRequest()


def _record_signal(signum: int, _frame: object) -> None:
    # Only record: the step in flight finishes, then the loop checkpoints and stops.
    STOP_REQUEST.request(f"signal {signal.Signals(signum).name}")
    logger.warning("%s received: finishing the current step, then checkpoint and stop", signal.Signals(signum).name)


def install_stop_handlers() -> None:
    """SIGUSR1 and SIGTERM set STOP_REQUEST instead of killing the process (main thread only, as Python requires)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _record_signal)


@contextmanager
def stop_handlers() -> Iterator[StopRequest]:
    """install_stop_handlers() for the duration of a block, restoring the previous handlers afterwards.

    Installed again around the loop even when `python -m cipo_nemo` installed them at start: joining or starting
    Ray in between may have replaced the SIGTERM handler.
    """
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    install_stop_handlers()
    try:
        yield STOP_REQUEST
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def driver_uptime_s() -> float:
    """Seconds since this process started (not since the loop started: setup counts against a wall-clock limit)."""
    return time.time() - psutil.Process().create_time()


def next_step_crosses(*, elapsed_s: float, step_s: float, save_s: float, limit_s: float) -> bool:
    """Would one more step plus its checkpoint end after `limit_s`? Then save now, while there is time."""
    return elapsed_s + step_s + save_s > limit_s
