"""Stopping early on purpose through the real loop (HF backends in this process): checkpoint_must_save_by saves and
stops after the step that would cross it, a rerun resumes and finishes; a stop request that arrives before the first
step ends the run without a step. (The signal path under Slurm: tests/cluster/test_launcher.py.)"""

import json
import os
import signal

import pytest

from test_loop_hf import BASE, _overrides

from cipo_nemo.loop import train
from cipo_nemo.trainer import setup, shutdown
from cipo_nemo.config import load_config
from cipo_nemo.utils.preemption import stop_handlers

pytestmark = pytest.mark.slow  # the training loop end to end


def _train(model, run_dir, *extra, signal_first: bool = False):
    components = setup(load_config(BASE, _overrides(model, run_dir, "validation.every=0", "grpo.num_steps=3",
                                                    "checkpointing.save_every=0", "logger.plot=false",
                                                    "logger.tensorboard=false", *extra)))
    try:
        with stop_handlers():  # as `python -m cipo_nemo` has them from its start
            if signal_first:
                os.kill(os.getpid(), signal.SIGUSR1)  # during setup, before any step
            return train(components)
    finally:
        shutdown(components)


def _steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_must_save_by_stops_after_a_checkpoint_and_resumes(arithmetic_model, tmp_path):
    run_dir = tmp_path / "run"
    # This process is older than 1 s, so the first step already "would cross" the limit.
    summary = _train(arithmetic_model, run_dir, "checkpointing.checkpoint_must_save_by=00:00:00:01")
    assert summary.stopped_early.startswith("checkpoint_must_save_by 00:00:00:01")
    assert summary.steps_done == 1 and _steps(run_dir) == [1]
    assert [p.name for p in (run_dir / "checkpoints").glob("step_*")] == ["step_000001"]
    assert not (run_dir / "hf_model").exists()  # no end-of-run export for a run that is not finished

    summary = _train(arithmetic_model, run_dir)
    assert summary.stopped_early is None and summary.steps_done == 2
    assert _steps(run_dir) == [1, 2, 3]


def test_stop_requested_before_the_first_step(arithmetic_model, tmp_path):
    summary = _train(arithmetic_model, tmp_path / "run", signal_first=True)
    assert summary.stopped_early == "signal SIGUSR1" and summary.steps_done == 0
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or _steps(tmp_path / "run") == []
