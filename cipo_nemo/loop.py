"""The run around the CIPO step (`trainer.cipo_step`, or `async_loop.async_step` with async.enabled): steps
start_step+1 .. num_steps, validation and checkpoint cadence, the progress line, early stops that leave a resumable
checkpoint, the curves and the final HF export. A worker death or a stalled generator raised by a step is labelled
with the step and the stage it ended (`during`), so the driver's one line names them."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from cipo_nemo.async_loop import async_step, attach_pipeline
from cipo_nemo.config.durations import parse_duration
from cipo_nemo.trainer import Components, cipo_step, save_checkpoint, validate
from cipo_nemo.utils.preemption import StopRequest, driver_uptime_s, next_step_crosses, stop_handlers
from cipo_nemo.utils.timing import format_duration

logger = logging.getLogger(__name__)

HF_MODEL_DIR = "hf_model"
SAVE_REQUEST = "SAVE_NOW"
# Exit status of `python -m cipo_nemo` when the run stopped early on purpose (SIGUSR1/SIGTERM, or
# checkpointing.checkpoint_must_save_by) after writing a complete checkpoint: "not done, resume me". 75 is
# EX_TEMPFAIL of sysexits.h; slurm/ray_on_slurm.sh requeues the job on it.
REQUEUE_EXIT_CODE = 75


@dataclass(frozen=True)
class RunSummary:
    run_dir: Path
    steps_done: int
    last_metrics: dict[str, float | None]
    plot: Path | None
    stopped_early: str | None = None  # why the run stopped before num_steps (a checkpoint of the last step exists)
    rho_at_bound_share: float | None = None  # CIPO: share of the run's steps with rho at rho.min or rho.max


def train(c: Components) -> RunSummary:
    """Steps start_step+1 .. num_steps, with validation, checkpoints and a progress line per step.

    Stops early, after the step in flight and a checkpoint, on SIGUSR1/SIGTERM, before
    checkpointing.checkpoint_must_save_by or after checkpointing.stop_after_step; the summary then says why
    (`python -m cipo_nemo` exits with REQUEUE_EXIT_CODE).
    """
    attach_pipeline(c)
    with stop_handlers() as stop:
        try:
            return _train_steps(c, stop)
        except Exception as error:
            if getattr(error, "during", None) is None:
                error.during = f"step {c.progress.label_step}, stage {c.progress.current_stage}"
            raise
        finally:
            stop.clear()  # honoured (or the run ended): a later run in this process starts clean


def _train_steps(c: Components, stop: StopRequest) -> RunSummary:
    cfg = c.cfg
    total = cfg.grpo.num_steps
    last: dict[str, float | None] = {}
    started = time.monotonic()
    longest_step_s, last_save_s = 0.0, 0.0
    # asked during setup, or this part was done before: the latest checkpoint is this state
    early = stop.reason or part_ends(c, c.start_step)
    if early is not None and c.start_step < total:
        return _stopped(c, last, early)
    step_of = async_step if c.pipeline is not None else cipo_step
    for step in range(c.start_step + 1, total + 1):
        step_started = time.monotonic()
        c.progress.begin_step(step, total)
        last = step_of(c, step)
        if cfg.validation.every and step % cfg.validation.every == 0:
            c.progress.stage("validate")
            last.update(validate(c, step))
        c.metrics.log(step, last)
        c.progress.end_step(last)
        print_progress(step, total, last, elapsed=time.monotonic() - started, done=step - c.start_step)
        longest_step_s = max(longest_step_s, time.monotonic() - step_started)
        stop_reason = None if step == total else (stop.reason or deadline_reached(c, longest_step_s, last_save_s)
                                                  or part_ends(c, step))
        if checkpoint_due(c, step) or stop_reason is not None:
            save_started = time.monotonic()
            save_checkpoint(c, step, last)
            last_save_s = time.monotonic() - save_started
        if stop_reason is not None:
            return _stopped(c, last, stop_reason, steps_done=step - c.start_step)
    if cfg.checkpointing.save_hf_at_end:
        c.policy.save_hf(c.run_dir / HF_MODEL_DIR)
    plot = maybe_plot(c)
    return RunSummary(run_dir=c.run_dir, steps_done=total - c.start_step, last_metrics=last, plot=plot,
                      rho_at_bound_share=rho_bound_share(c))


def deadline_reached(c: Components, step_s: float, save_s: float) -> str | None:
    """checkpointing.checkpoint_must_save_by: stop now when one more step (the longest so far) and its save would
    end after the limit."""
    limit = c.cfg.checkpointing.checkpoint_must_save_by
    if limit is None:
        return None
    elapsed = driver_uptime_s()
    if next_step_crosses(elapsed_s=elapsed, step_s=step_s, save_s=save_s, limit_s=parse_duration(limit)):
        return f"checkpoint_must_save_by {limit} (driver up {elapsed:.0f} s, a step takes up to {step_s:.0f} s)"
    return None


def part_ends(c: Components, step: int) -> str | None:
    """checkpointing.stop_after_step: this invocation's part of the run ends at that step."""
    last = c.cfg.checkpointing.stop_after_step
    return f"stop_after_step {last}" if last is not None and step >= last else None


def _stopped(c: Components, last: dict[str, float | None], reason: str, *, steps_done: int = 0) -> RunSummary:
    logger.warning("stopping early (%s); resume continues from %s", reason, c.checkpoints.latest())
    return RunSummary(run_dir=c.run_dir, steps_done=steps_done, last_metrics=last, plot=None, stopped_early=reason,
                      rho_at_bound_share=rho_bound_share(c))


def rho_bound_share(c: Components) -> float | None:
    return c.rho.bound_share if c.cfg.cipo.enabled else None


def checkpoint_due(c: Components, step: int) -> bool:
    """Every `save_every` steps, at the last step, and on demand: `touch <output_dir>/SAVE_NOW` during a run."""
    request = c.run_dir / SAVE_REQUEST
    on_demand = request.exists()
    if on_demand:
        request.unlink()
    every = c.cfg.checkpointing.save_every
    return on_demand or step == c.cfg.grpo.num_steps or (every > 0 and step % every == 0)


def print_progress(step: int, total: int, m: dict[str, float | None], *, elapsed: float, done: int) -> None:
    eta = elapsed / done * (total - step)
    parts = [f"step {step}/{total}", f"reward {m['reward/base_mean']:.3f}", f"pass {m['reward/base_pass_rate']:.2f}"]
    if m["cipo/anchors_total"]:
        for label, key in (("corr", "reward/correction_mean"), ("fix", "cipo/correction_success"),
                           ("keep", "cipo/retention"), ("rho", "cipo/rho")):
            if m[key] is not None:
                parts.append(f"{label} {m[key]:.2f}")
    parts.append(f"loss {m['train/loss']:.4f}")
    skipped = m["train/samples_skipped/base"] + m["train/samples_skipped/correction"]
    if m["train/optimizer_steps"] == 0:
        parts.append("no optimizer step: no sample carries gradient")
    elif skipped:
        parts.append(f"skipped {skipped:.0f} (A=0)")
    parts += [f"{m['timing/step']:.1f}s/step", f"ETA {format_duration(eta)}"]
    print(" | ".join(parts), flush=True)


def maybe_plot(c: Components) -> Path | None:
    if not c.cfg.logger.plot:
        return None
    from cipo_nemo.utils.plots import plot_training_curves

    return plot_training_curves(c.run_dir)
