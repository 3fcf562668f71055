"""slurm/ray_on_slurm.sh under a real Slurm: sbatch a tiny CPU run (Megatron-core policy as a Ray actor on the
launcher's Ray head, HF generation in the driver); a SIGUSR1 to the batch shell checkpoints, requeues and resumes;
a failing dry run stops the job before Ray starts."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
from slurm_harness import HERE, REPO, SlurmCluster, TinyRun

pytestmark = [pytest.mark.cluster, pytest.mark.slow]  # real Slurm and Ray

JOB_SCRIPT = HERE / "tiny_job.sh"
JOB_TIMEOUT_S = 300


def _overrides(tiny: TinyRun, run_dir: Path, num_steps: int, *extra: str) -> list[str]:
    return [
        f"run.output_dir={run_dir}", f"grpo.num_steps={num_steps}", "grpo.prompts_per_step=2",
        "grpo.samples_per_prompt=2", "cipo.samples_per_anchor=2", "cipo.max_anchors_per_step=2",
        "cipo.attempt_max_tokens=16", "data.train.kind=file", f"data.train.file.path={tiny.train_file}",
        "verifier.num_workers=1", f"policy.model_name={tiny.model_dir}", "policy.backend=megatron",
        "policy.megatron.layer_spec=local", "policy.precision=fp32", "policy.micro_batch_size=8",
        "policy.max_total_sequence_length=256", "generation.backend=hf", "generation.max_new_tokens=8",
        "checkpointing.save_every=0", "checkpointing.save_hf_at_end=false", "logger.tensorboard=false",
        "logger.plot=false", *extra,
    ]


def _submit(slurm: SlurmCluster, tmp_path: Path, overrides: list[str], *, env: dict[str, str] | None = None,
            sbatch_args: tuple[str, ...] = ()) -> tuple[str, Path]:
    """sbatch the tiny job script (the real launcher); returns the job id and its log folder."""
    log_root = tmp_path / "logs"
    log_root.mkdir(exist_ok=True)
    env = {"CONFIG": "conf/cipo_base.yaml", "REPO_DIR": str(REPO), "DEVICES_PER_NODE": "1", "RAY_LOOPBACK": "1",
           "LOG_ROOT": str(log_root), "RAY_TMPDIR": str(slurm.base), "RAY_NODES_TIMEOUT_S": "120", **(env or {})}
    job_id = slurm.submit(JOB_SCRIPT, *overrides, env=env, output=f"{log_root}/slurm-%j.out", sbatch_args=sbatch_args)
    return job_id, log_root / job_id


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*")
                  if (p / "COMPLETE").is_file())


def _processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains `text` (every Ray process of a node names its temp dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _describe(slurm: SlurmCluster, job_id: str, log_dir: Path) -> str:
    parts = [str(slurm.job(job_id))]
    for name in ("launcher.log", "driver.log", "ray-head.log"):
        if (log_dir / name).is_file():
            parts.append(f"--- {name}\n" + (log_dir / name).read_text()[-4000:])
    return "\n".join(parts)


def test_job_completes_on_the_launchers_ray_cluster(slurm_cluster, tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    job_id, log_dir = _submit(slurm_cluster, tmp_path, _overrides(tiny_run, run_dir, 2))
    info = slurm_cluster.wait_until_done(job_id, JOB_TIMEOUT_S)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), _describe(slurm_cluster, job_id, log_dir)
    assert _steps(run_dir) == [1, 2]
    assert _checkpoint_steps(run_dir) == [2]

    # The driver joined the head the launcher started: its config names that address, and the head's session
    # holds a core-driver log of the driver's PID (an in-process Ray would have had its own session elsewhere).
    launcher = (log_dir / "launcher.log").read_text()
    address = re.search(r"Ray head on \S+ at (127\.0\.0\.1:\d+)", launcher).group(1)
    driver_pid = re.search(r"driver pid (\d+) started", launcher).group(1)
    assert f"ray_address: {address}" in (run_dir / "config.yaml").read_text()
    ray_tmp = slurm_cluster.base / f"ray-{job_id}-h"
    assert list(ray_tmp.glob(f"session_*/logs/python-core-driver-*_{driver_pid}.log")), launcher
    # ... and the Megatron policy worker ran in an actor of that head (Ray tags an actor's log with its class).
    worker_logs = [p.read_text() for p in ray_tmp.glob("session_*/logs/worker-*.out")]
    assert any(":actor_name:_WorkerHost" in text and "megatron" in text for text in worker_logs)
    assert "driver exited with status 0" in launcher
    # Ray was stopped by PID when the job ended: nothing of this job's Ray is left.
    assert _processes_mentioning(str(ray_tmp)) == []


def test_usr1_checkpoints_requeues_and_resumes(slurm_cluster, tiny_run, tmp_path):
    run_dir, num_steps = tmp_path / "run", 8  # the signal comes after step 1; steps take seconds
    job_id, log_dir = _submit(slurm_cluster, tmp_path, _overrides(tiny_run, run_dir, num_steps))
    # metrics.jsonl is opened at setup: wait until step 1 is in it
    _wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and _steps(run_dir), slurm_cluster, job_id, log_dir,
              "step 1")
    # What `#SBATCH --signal=B:USR1@300` does before the time limit: the signal to the batch shell only.
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job_id)
    # The attempt ends (COMPLETING), then the job waits as PENDING for its next start, held until its begin time
    # (Slurm shows Reason=None for a moment after the requeue, until its scheduler has looked at the job).
    _wait_for(lambda: (lambda i: (i["Restarts"], i["JobState"], i["Reason"]) == ("1", "PENDING", "BeginTime"))(
        slurm_cluster.job(job_id)), slurm_cluster, job_id, log_dir, "the requeue, held until its begin time")
    # Slurm holds a requeued job for ~2 min (EligibleTime = requeue + 121 s) so that its next launch credential
    # postdates the revoked one (whole seconds). Release it sooner, but only once the node has finished the first
    # attempt and a new second has begun: released at once, slurmd refused it ("Job credential revoked").
    _wait_for(lambda: slurm_cluster.run("sinfo", "-h", "-N", "-o", "%t").strip() == "idle", slurm_cluster, job_id,
              log_dir, "the node to be idle")
    time.sleep(2)
    slurm_cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    info = slurm_cluster.wait_until_done(job_id, JOB_TIMEOUT_S)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), \
        _describe(slurm_cluster, job_id, log_dir)

    driver = (log_dir / "driver.log").read_text()
    assert "stopped early (signal SIGUSR1)" in driver
    stopped_at = int(re.search(r"stopping early \(signal SIGUSR1\); resume continues from \S+step_(\d+)", driver).group(1))
    assert 1 <= stopped_at < num_steps, driver[-3000:]
    assert f"resumed from {run_dir}/checkpoints/step_{stopped_at:06d} at step {stopped_at}" in driver
    launcher = (log_dir / "launcher.log").read_text()
    assert "driver exited with status 75" in launcher and f"requeueing job {job_id}" in launcher
    assert f"job {job_id} (restart 1)" in launcher
    # The first attempt's steps are not redone: every step is logged exactly once.
    assert _steps(run_dir) == list(range(1, num_steps + 1))
    assert _checkpoint_steps(run_dir) == [stopped_at, num_steps]  # keep_last 2: the stop's and the final one


def test_failing_dry_run_refuses_to_start_ray(slurm_cluster, tiny_run, tmp_path):
    overrides = _overrides(tiny_run, tmp_path / "run", 2, f"data.train.file.path={tmp_path / 'missing.jsonl'}")
    job_id, log_dir = _submit(slurm_cluster, tmp_path, overrides)
    info = slurm_cluster.wait_until_done(job_id, JOB_TIMEOUT_S)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "1:0"), _describe(slurm_cluster, job_id, log_dir)
    assert "data error" in (log_dir / "driver.log").read_text() and "missing.jsonl" in (log_dir / "driver.log").read_text()
    assert "the dry run failed (exit 2" in (log_dir / "launcher.log").read_text()
    assert not (log_dir / "ray-head.log").exists()
    assert not (slurm_cluster.base / f"ray-{job_id}-h").exists()
    assert not (tmp_path / "run").exists()


def _wait_for(condition, slurm: SlurmCluster, job_id: str, log_dir: Path, what: str, timeout_s: float = JOB_TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while not condition():
        state = slurm.job(job_id)["JobState"]
        assert state in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED"), \
            f"job ended before {what}:\n" + _describe(slurm, job_id, log_dir)
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s:\n" + _describe(slurm, job_id, log_dir)
        time.sleep(0.3)


def test_container_mode_driver_joins_the_head_across_containers(slurm_cluster, tiny_run, tmp_path, tmp_path_factory):
    """CONTAINER_IMAGE set, with tests/cluster/fake_pyxis/srun standing in for pyxis: each container step has its own
    /tmp, as each enroot container does. The dry run, the free ports, the head, the wait and the driver are separate
    steps; the driver must still reach the head's raylet, whose sockets live in RAY_TMPDIR."""
    run_dir, pyxis_log = tmp_path / "run", tmp_path / "pyxis.log"
    shared_tmp = tmp_path_factory.getbasetemp()  # the tiny model, the data, this test's run and log folders
    env = {"CONTAINER_IMAGE": "/images/cipo_nemo.sqsh", "CONTAINER_MOUNTS": f"{shared_tmp}:{shared_tmp}",
           "FAKE_PYXIS_LOG": str(pyxis_log), "PATH": f"{HERE / 'fake_pyxis'}:{slurm_cluster.env['PATH']}"}
    job_id, log_dir = _submit(slurm_cluster, tmp_path, _overrides(tiny_run, run_dir, 1), env=env)
    try:
        info = slurm_cluster.wait_until_done(job_id, JOB_TIMEOUT_S)
        steps = pyxis_log.read_text().splitlines() if pyxis_log.exists() else []
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), \
            _describe(slurm_cluster, job_id, log_dir) + "\n" + "\n".join(steps)
    finally:
        for leftover in Path("/var/tmp/fake-pyxis").glob(f"{job_id}-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    assert _steps(run_dir) == [1]
    # five container steps: dry run, free ports and token (no Python on the bare host), Ray head, wait for the
    # nodes, driver; none saw the batch shell's /tmp
    assert len(steps) == 5 and all("private /tmp" in step for step in steps)
    assert [("--dry-run" in s, "secrets" in s, "start --head" in s, "wait_for_nodes" in s) for s in steps] == [
        (True, False, False, False), (False, True, False, False), (False, False, True, False),
        (False, False, False, True), (False, False, False, False)]
    launcher = (log_dir / "launcher.log").read_text()
    # the driver joined the launcher's head: its core-driver log is in that head's session (in RAY_TMPDIR)
    assert list((slurm_cluster.base / f"ray-{job_id}-h").glob("session_*/logs/python-core-driver-*.log")), launcher
    assert "driver exited with status 0" in launcher
