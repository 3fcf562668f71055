"""Helpers of tests/cluster: a handle on the test Slurm (sbatch, scontrol) and the tiny run's files."""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DONE_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")


@dataclass(frozen=True)
class SlurmCluster:
    base: Path
    env: dict[str, str]  # the environment for sbatch/scontrol (SLURM_CONF, PATH with this venv first)

    def run(self, *args: str) -> str:
        return subprocess.run(args, env=self.env, check=True, capture_output=True, text=True).stdout

    def submit(self, script: Path, *args: str, env: dict[str, str], output: str, sbatch_args: tuple[str, ...] = ()) -> str:
        """sbatch `script args...` with the environment `env` added; `output` is the job's stdout file."""
        out = subprocess.run(["sbatch", "--parsable", f"--output={output}", *sbatch_args, str(script), *args],
                             env={**self.env, **env}, cwd=REPO, check=True, capture_output=True, text=True).stdout
        return out.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as key -> value (no accounting here, so this is where states and exit codes are)."""
        text = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def cancel_all(self, timeout_s: float = 30.0) -> None:
        """Cancel every job of this (private) Slurm and wait for them to go, so that no job outlives the daemons."""
        jobs = self.run("squeue", "-h", "-o", "%i").split()
        if jobs:
            self.run("scancel", *jobs)
        deadline = time.monotonic() + timeout_s
        while self.run("squeue", "-h", "-o", "%i").strip() and time.monotonic() < deadline:
            time.sleep(0.5)

    def wait_until_done(self, job_id: str, timeout_s: float) -> dict[str, str]:
        # Poll: `sbatch --wait` returns up to ~40 s late on this Slurm.
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info["JobState"] in DONE_STATES:
                return info
            time.sleep(0.5)
        self.run("scancel", job_id)
        raise AssertionError(f"job {job_id} not done within {timeout_s} s: {self.job(job_id)}")


@dataclass(frozen=True)
class TinyRun:
    model_dir: Path
    train_file: Path
