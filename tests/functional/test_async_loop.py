"""The asynchronous loop on the in-process HF backends (the sampling thread overlaps training in this process, with
the same pipeline as on Ray): at max_trajectory_age 0 it equals the synchronous loop exactly, metrics and weights;
at age 1 batch s is sampled by weight version s-2 and carries it, and a run SIGKILLed while a batch is in flight,
then rerun, ends exactly where the uninterrupted run ends. The vLLM + Megatron drills (a stalled and a killed
engine) are in test_async_stack.py."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_loop_hf import BASE, _overrides, _records, _run

from cipo_nemo.models.policy.hf_policy import CHECKPOINT_FILE

pytestmark = pytest.mark.slow  # the training loop end to end

REPO = Path(__file__).resolve().parents[2]
QUIET = ("logger.plot=false", "logger.tensorboard=false")
TRAINING = ("reward/base_mean", "reward/correction_mean", "train/loss", "train/grad_norm", "train/clip_fraction_low",
            "train/token_mult_prob_error", "cipo/anchors_total", "cipo/retention", "cipo/rho", "cipo/rho_next",
            "tokens/generated", "tokens/trained")


def _weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    checkpoint = run_dir / "checkpoints" / f"step_{step:06d}" / "policy" / CHECKPOINT_FILE
    return torch.load(checkpoint, weights_only=True)["model"]


def test_age_zero_equals_the_synchronous_loop(arithmetic_model, tmp_path):
    common = ("validation.every=0", "grpo.num_steps=3", "checkpointing.save_every=0", *QUIET)
    _run(arithmetic_model, tmp_path / "sync", *common)
    _run(arithmetic_model, tmp_path / "async", *common, "async.enabled=true", "async.max_trajectory_age=0")
    sync, overlapped = _records(tmp_path / "sync"), _records(tmp_path / "async")
    assert [r["step"] for r in overlapped] == [1, 2, 3]
    assert [r["async/trajectory_age"] for r in overlapped] == [0, 0, 0]
    assert [r["async/sampled_by_version"] for r in overlapped] == [0, 1, 2]
    for expected, got in zip(sync, overlapped):
        for key in TRAINING:
            assert got[key] == expected[key], (expected["step"], key)
    for name, tensor in _weights(tmp_path / "sync", 3).items():
        assert torch.equal(_weights(tmp_path / "async", 3)[name], tensor), name


def _wait_for(path: Path, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert process.poll() is None, f"the run ended before writing {path}"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout_s} s"
        time.sleep(0.05)


def test_one_step_off_killed_during_overlap_and_resumed_equals_uninterrupted(arithmetic_model, tmp_path):
    # validation every 2 steps takes the engine between batches; seq-mask-tis corrects the one-step-old batches
    overlap = ("grpo.num_steps=4", "checkpointing.save_every=1", "async.enabled=true", "loss.importance_sampling=true",
               "loss.is_type=seq-mask-tis", *QUIET)
    _run(arithmetic_model, tmp_path / "straight", *overlap)
    straight = _records(tmp_path / "straight")
    assert [r["async/sampled_by_version"] for r in straight] == [0, 0, 1, 2]
    assert [r["async/trajectory_age"] for r in straight] == [0, 1, 1, 1]
    assert all(r["timing/rollout"] > 0 and "timing/wait_for_rollouts" in r for r in straight)
    assert all(0 <= r["train/is_masked_sequence_fraction"] <= 1 for r in straight)

    killed_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "cipo_nemo", "--config", str(BASE),
               *_overrides(arithmetic_model, killed_dir, *overlap)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True, env=os.environ | {"PYTHONPATH": str(REPO)})
    try:  # checkpoint 2 holds batch 3 (sampled by version 1); the kill lands while batch 4 is sampled, or sooner
        _wait_for(killed_dir / "checkpoints" / "step_000002" / "COMPLETE", process, timeout_s=600)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    _run(arithmetic_model, killed_dir, *overlap)
    resumed = _records(killed_dir)
    assert [r["step"] for r in resumed][-2:] == [3, 4]
    for expected, got in zip(straight[2:], resumed[-2:]):
        assert got["async/sampled_by_version"] == expected["async/sampled_by_version"]
        for key in (*TRAINING, "val/reward_mean"):  # val/* every 2 steps; cipo/retention None without anchors
            value = expected.get(key)
            close = value if value is None else pytest.approx(value, rel=1e-6, abs=1e-9)
            assert got.get(key) == close, (expected["step"], key)
    for name, tensor in _weights(tmp_path / "straight", 4).items():
        torch.testing.assert_close(_weights(killed_dir, 4)[name], tensor, rtol=1e-6, atol=1e-8, msg=name)
