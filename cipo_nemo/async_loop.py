"""The asynchronous step (`async.enabled`): the trainer's stages (cipo_nemo/trainer.py) over the rollout pipeline
(cipo_nemo/async_rollouts.py), which samples the next batch in a background thread while this one trains.

    step s:  take batch s -> refit the engine to version s-1, start sampling batch s+1 (age 1) -> join, advantages,
             logprobs, train (version s) -> update rho

CIPO under the one-step-old schedule (docs/training_options.md): batch s's anchors are chosen with the rho known
when batch s is launched (after the update from batch s-1-age), rho is updated from the retention of the batch that
is trained, and a correction is always sampled by the same weights as the attempt it corrects (both streams of a
batch come from one weight version: the engine is refit only between batches).

The sampling thread works on a view of the run's components with its own tokenizer, stage timer and a silent
progress line; the prompt sampler, scorer and engine are shared, and the trainer's thread touches them only while
no batch is in flight (the pipeline settles before checkpoints and validation).
"""

from __future__ import annotations

import copy
import io
import logging
from dataclasses import replace
from typing import Any

from cipo_nemo.async_rollouts import RolloutPipeline, SampledBatch, SamplingJob
from cipo_nemo.models.factory import build_generation
from cipo_nemo.trainer import (
    Components,
    StepRollouts,
    connect_refit,
    refit,
    sample_rollouts,
    shutdown_generation,
    step_metrics,
    train_on_rollouts,
    update_rho,
)
from cipo_nemo.utils.progress import StepProgress
from cipo_nemo.utils.timing import StageTimer

logger = logging.getLogger(__name__)


def attach_pipeline(c: Components) -> None:
    """async.enabled: the run's rollout pipeline, holding the batch a resumed checkpoint sampled ahead."""
    if not c.cfg.async_.enabled or c.pipeline is not None:
        return
    c.pipeline = build_pipeline(c)
    c.pipeline.load_state_dict(c.resumed_batch, policy_version=c.start_step)
    c.resumed_batch = None


def async_step(c: Components, step: int) -> dict[str, float | None]:
    """The step with batches sampled ahead: take batch `step` (sampled by weight version max(0, step - 1 - age)),
    start sampling the next one from the current weights (age 1), then train while it samples."""
    with c.timer.time("wait_for_rollouts"):
        sampled = c.pipeline.take(step)
    c.pipeline.prefetch(step + 1)
    if not c.pipeline.busy():
        c.generation.sleep(level=2)  # age 0, colocated: as in the synchronous step
    age = c.pipeline.policy_version - sampled.version
    batch, cipo_metrics, train_metrics = train_on_rollouts(c, sampled.rollouts, step, off_policy=age > 0)
    c.pipeline.trained()
    update_rho(c, cipo_metrics.retention)
    metrics = step_metrics(c, sampled.rollouts, batch, cipo_metrics.as_dict(), train_metrics,
                           sampling_timings=sampled.timings)
    return metrics | async_metrics(c, sampled, age)


def build_pipeline(c: Components) -> RolloutPipeline:
    """The sampling stages of a batch as a background job, the refit, and the replacement of a dead engine."""
    overlap = c.cfg.async_
    tokenizer = copy.deepcopy(c.tokenizer)  # the sampling thread's own: a fast tokenizer is not for two threads

    def timed_refit() -> None:
        with c.timer.time("refit"):
            refit(c)

    def start_sampling(step: int) -> SamplingJob:
        rho, position = c.rho.rho, c.sampler.state_dict()  # read now, in the trainer's thread

        def job(on_stage: Any) -> tuple[StepRollouts, dict[str, float]]:
            view = replace(c, tokenizer=tokenizer, timer=StageTimer(), progress=StepProgress(stream=io.StringIO()))
            view.timer.on_stage = on_stage
            c.sampler.load_state_dict(position)  # a batch sampled again (engine replaced) draws the same prompts
            rollouts = sample_rollouts(view, step, rho=rho)
            timings = view.timer.pop()
            timings.pop("timing/step")
            return rollouts, timings

        return job

    return RolloutPipeline(start_sampling=start_sampling, refit=timed_refit,
                           replace_engine=lambda: replace_generation_engine(c), engine_died=generation_engine_died,
                           max_trajectory_age=overlap.max_trajectory_age, max_wait_s=overlap.max_wait_s,
                           max_engine_restarts=c.cfg.cluster.max_engine_restarts, num_steps=c.cfg.grpo.num_steps)


def generation_engine_died(error: BaseException) -> bool:
    from cipo_nemo.distributed import WorkerDiedError

    return isinstance(error, WorkerDiedError) and error.group == "generation"


def replace_generation_engine(c: Components) -> None:
    """A new generation backend in place of one whose engine died: the old actors and their refit transport go, new
    ones take their bundles and load the initial weights, a new transport reaches them (broadcast: a new group with
    the new engine workers), and the pipeline then refits them to the current policy."""
    try:
        shutdown_generation(c, quick=True)
    except Exception:  # noqa: BLE001 - the dead engine's actor may fail its own shutdown; its actors are killed
        logger.warning("the dead generation engine's shutdown failed", exc_info=True)
    c.generation = build_generation(c.cfg, c.cluster)
    connect_refit(c)


def async_metrics(c: Components, sampled: SampledBatch, age: int) -> dict[str, float]:
    """async/trajectory_age: the trained policy's version minus the version that sampled the batch;
    async/generation_s: the batch's sampling stages (in the background); the trainer's wait is
    timing/wait_for_rollouts."""
    return {"async/trajectory_age": float(age), "async/sampled_by_version": float(sampled.version),
            "async/generation_s": sum(sampled.timings.values()),
            "async/engine_restarts": float(c.pipeline.engine_restarts)}
