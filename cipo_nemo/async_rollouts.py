"""One step off-policy: the next step's rollouts are sampled in a background thread while the policy trains.

Schedule (`async.max_trajectory_age`, 0 or 1; docs/notes/async.md). Weight version v is the policy after v RL
steps (0: the start). Batch s, the one step s trains on, is sampled by version

    v(s) = max(0, s - 1 - age)

so with age 1 batch s+1 is sampled by version s-1 while the policy trains batch s into version s, and with age 0
the machinery runs without overlap (batch s by version s-1, as the synchronous loop). The schedule is fixed, so
the same seed gives the same run: each batch uses the seeds of its own step, and everything a batch's sampling
reads from the trainer (rho, the prompt sampler's position) is captured when it is launched, in the trainer's
thread. Both streams of a batch (base rollouts, anchors, corrections) come from one weight version: the engine is
refit only between batches. Every batch carries the version that sampled it; `take` raises StaleBatchError
rather than hand out one older than max_trajectory_age versions.

Bounded waits, never a silent stall: the trainer waits at most `async.max_wait_s` for a batch, for a refit of the
engine or for a new engine, then raises GenerationStalledError (one line naming the side, its stage and the step;
`python -m cipo_nemo` exits 75 and the resumed run samples that batch again from the checkpoint's state). An engine
that died (sampling or being refit) is replaced in place by `replace_engine` and refit to the current policy, and
the interrupted batch is sampled again with the same seeds and prompts (it records the version it was really
sampled with), up to `cluster.max_engine_restarts` times per driver process; any other failure of the sampling
thread is raised in the trainer's thread when it takes the batch.

The pipeline is one step deep and holds at most one batch: `settle` waits for the batch in flight (before a
checkpoint, which stores it, and before validation, which needs the engine), so a checkpoint at step t holds
batch t+1 and a resumed run continues exactly as the uninterrupted one did.

What sampling, refit and replacing the engine mean is the trainer's (cipo_nemo/trainer.py hands in callables):
this module knows threads, versions and waits, not models.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cipo_nemo.config import MasterConfig

logger = logging.getLogger(__name__)

# What the sampling thread runs for one batch: told each stage as it starts, returns (rollouts, stage timings).
SamplingJob = Callable[[Callable[[str], None]], tuple[Any, dict[str, float]]]


class GenerationStalledError(RuntimeError):
    """The trainer waited longer than async.max_wait_s for a batch; the message is one line."""


class StaleBatchError(RuntimeError):
    """A batch older than async.max_trajectory_age weight versions was about to be trained on."""


@dataclass
class SampledBatch:
    step: int  # the step that trains on it
    version: int  # the weight version that sampled it (the policy after `version` steps)
    rollouts: Any  # what the sampling stages produced (trainer.StepRollouts)
    timings: dict[str, float]  # timing/<stage> of its sampling stages (run in the background)
    engine_restarts: int = 0  # engines replaced while this batch was sampled


@dataclass
class _InFlight:
    step: int
    version: int
    stage: str = "starting"
    result: tuple[Any, dict[str, float]] | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


def sampling_version(step: int, *, max_trajectory_age: int) -> int:
    """v(s) = max(0, s - 1 - age): the weight version that samples batch `step`."""
    return max(0, step - 1 - max_trajectory_age)


def describe_schedule(cfg: MasterConfig) -> list[str]:
    """The dry run's lines for async.enabled: the schedule, and a note when one-step-old batches train without an
    off-policy correction."""
    overlap = cfg.async_
    if not overlap.enabled:
        return []
    behind = "s-2 while the policy trains on batch s-1" if overlap.max_trajectory_age else "s-1, without overlap"
    lines = [f"async: batch s is sampled by the weights after step {behind} (both streams from one version); the "
             f"trainer waits at most {overlap.max_wait_s:g} s (then exit 75); a dead engine is replaced in place up "
             f"to {cfg.cluster.max_engine_restarts} time(s)"]
    if overlap.max_trajectory_age and not cfg.loss.importance_sampling:
        lines.append("note: async.max_trajectory_age 1 trains on batches one weight version old without an "
                     "off-policy correction: consider loss.importance_sampling=true (tis, or is_type seq-mask-tis)")
    return lines


class RolloutPipeline:
    """Batches sampled ahead by `start_sampling(step)` jobs, one at a time, in a daemon thread."""

    def __init__(
        self,
        *,
        start_sampling: Callable[[int], SamplingJob],
        refit: Callable[[], None],
        replace_engine: Callable[[], None],
        engine_died: Callable[[BaseException], bool],
        max_trajectory_age: int,
        max_wait_s: float,
        max_engine_restarts: int,
        num_steps: int,
        policy_version: int = 0,
    ) -> None:
        self._start_sampling = start_sampling  # called in the trainer's thread: it captures what the job reads
        self._refit = refit
        self._replace_engine = replace_engine
        self._engine_died = engine_died
        self.max_trajectory_age = max_trajectory_age
        self.max_wait_s = max_wait_s
        self.max_engine_restarts = max_engine_restarts
        self.num_steps = num_steps
        self.policy_version = policy_version
        self.engine_version = policy_version  # a fresh engine holds version 0; a resumed run refits it first
        self.engine_restarts = 0
        self._in_flight: _InFlight | None = None
        self._ready: SampledBatch | None = None
        self._stuck = False  # a bounded engine call was given up on: the engine may still be inside it

    # ----- the trainer's calls, in step order

    def take(self, step: int) -> SampledBatch:
        """Batch `step`: the one sampled ahead, or sampled now (first step, age 0, a resume without one)."""
        if self._ready is None and self._in_flight is None:
            self._launch(step, version=self._current_engine())
        if self._in_flight is not None:
            self._settle()
        batch, self._ready = self._ready, None
        if batch is None or batch.step != step:
            raise RuntimeError(f"the rollout pipeline holds batch {batch and batch.step}, not batch {step}")
        age = self.policy_version - batch.version
        if age > self.max_trajectory_age:
            raise StaleBatchError(f"batch {step} was sampled by weight version {batch.version}, {age} versions "
                                  f"behind the policy (version {self.policy_version}); async.max_trajectory_age "
                                  f"is {self.max_trajectory_age}")
        return batch

    def prefetch(self, step: int) -> None:
        """With max_trajectory_age 1: refit the engine to the current policy and start sampling batch `step`
        (the trainer then trains the batch before it). No-op at age 0 and past the last step."""
        if self.max_trajectory_age == 0 or step > self.num_steps or self._in_flight or self._ready:
            return
        self._launch(step, version=self._current_engine())

    def trained(self) -> None:
        """The policy took a step: it is one version newer."""
        self.policy_version += 1

    def engine_current(self) -> None:
        """The engine holds the current policy and is idle (validation uses it): waits for the batch in flight."""
        self.settle()
        self._current_engine()

    def settle(self) -> None:
        """Wait (bounded) for the batch in flight, replacing a dead engine as `take` does; it stays ready."""
        if self._in_flight is not None:
            self._settle()

    def busy(self) -> bool:
        """The engine is in use: a batch is being sampled, or a call the trainer gave up waiting for runs on."""
        return self._stuck or (self._in_flight is not None and not self._in_flight.done.is_set())

    def state_dict(self) -> dict[str, Any]:
        """The batch sampled ahead, for the checkpoint (waits for it first)."""
        self.settle()
        return {"ready": self._ready}

    def load_state_dict(self, state: dict[str, Any] | None, *, policy_version: int) -> None:
        """After a resume: the policy (and the refit engine) are at `policy_version`; the checkpoint's batch, if
        it has one, is the next to train."""
        self.policy_version = self.engine_version = policy_version
        self._ready = (state or {}).get("ready")

    # ----- inside

    def _current_engine(self) -> int:
        """Refit the (idle) engine to the current policy unless it holds it already; returns that version."""
        while self.engine_version != self.policy_version:
            try:
                self._bounded(self._refit, f"refit to weight version {self.policy_version}")
            except Exception as error:
                self._restart_engine(error, interrupted=f"its refit to weight version {self.policy_version}")
                continue
            self.engine_version = self.policy_version
        return self.engine_version

    def _restart_engine(self, error: BaseException, *, interrupted: str) -> None:
        """Replace an engine that died in `interrupted`, or raise `error` (another failure, or no restart left)."""
        if not self._engine_died(error) or self.engine_restarts >= self.max_engine_restarts:
            raise error
        self.engine_restarts += 1
        logger.warning("the generation engine died in %s: %s; replacing it in place (engine restart %d of "
                       "cluster.max_engine_restarts=%d)", interrupted, error, self.engine_restarts,
                       self.max_engine_restarts)
        self._bounded(self._replace_engine, "replacement (a new engine)")
        self.engine_version = 0  # a new engine loads the initial weights

    def _bounded(self, call: Callable[[], None], what: str) -> None:
        """`call` (a refit, a new engine) in a helper thread, waited for at most max_wait_s."""
        failure: list[BaseException] = []

        def run() -> None:
            try:
                call()
            except BaseException as error:  # noqa: BLE001 - raised again in the trainer's thread
                failure.append(error)

        helper = threading.Thread(target=run, name="cipo-engine-call", daemon=True)
        helper.start()
        helper.join(timeout=self.max_wait_s)
        if helper.is_alive():
            self._stuck = True
            raise GenerationStalledError(f"generation stalled: the engine's {what} took longer than "
                                         f"async.max_wait_s={self.max_wait_s:g} s")
        if failure:
            raise failure[0]

    def _launch(self, step: int, *, version: int) -> None:
        job = self._start_sampling(step)
        flight = _InFlight(step=step, version=version)

        def run() -> None:
            try:
                flight.result = job(lambda stage: setattr(flight, "stage", stage))
            except BaseException as error:  # noqa: BLE001 - raised again in the trainer's thread
                flight.error = error
            finally:
                flight.done.set()

        self._in_flight = flight
        threading.Thread(target=run, name=f"cipo-rollouts-{step}", daemon=True).start()

    def _settle(self) -> None:
        restarts = 0
        while True:
            flight = self._in_flight
            self._wait(flight)
            self._in_flight = None
            if flight.error is None:
                rollouts, timings = flight.result
                self._ready = SampledBatch(step=flight.step, version=flight.version, rollouts=rollouts,
                                           timings=timings, engine_restarts=restarts)
                return
            flight.error.during = f"sampling batch {flight.step}, stage {flight.stage}"
            self._restart_engine(flight.error, interrupted=f"batch {flight.step}'s stage {flight.stage} (sampled "
                                                           "again with the same seeds)")
            restarts += 1
            self._launch(flight.step, version=self._current_engine())

    def _wait(self, flight: _InFlight) -> None:
        started = time.monotonic()
        if not flight.done.wait(timeout=self.max_wait_s):
            raise GenerationStalledError(
                f"generation stalled: no batch for step {flight.step} after {time.monotonic() - started:.0f} s "
                f"(async.max_wait_s={self.max_wait_s:g}); the generation side is in stage {flight.stage}, sampling "
                f"with weight version {flight.version}")
