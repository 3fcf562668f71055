"""Real Slurm and Ray on this machine: a one-node Slurm (Debian's packages, installed when missing) for the session,
jobs submitted with sbatch through the real launcher (slurm/ray_on_slurm.sh), a tiny model for the runs.

Needs root (it installs packages and starts munged, slurmctld and slurmd); the daemons are stopped by PID at the
end of the session. Measured costs: docs/notes/slurm_launcher.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from slurm_harness import HERE, SlurmCluster, TinyRun

from cipo_nemo.models.tiny import build_tiny_model_dir, build_tiny_tokenizer

SUMS = [(a, b) for a in range(5) for b in range(5)]


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.geteuid() != 0:
        raise RuntimeError("tests/cluster need root: they install Slurm and start munged, slurmctld and slurmd")
    # Short base path: slurmd's spool and the Ray temp dirs of the jobs hold Unix sockets (107-byte limit).
    base = Path(tempfile.mkdtemp(prefix="cipo-slurm-", dir="/tmp"))
    up = subprocess.run(["bash", str(HERE / "slurm_up.sh"), str(base)], capture_output=True, text=True)
    try:
        assert up.returncode == 0, f"slurm_up.sh failed:\n{up.stdout}\n{up.stderr}"
        env = {**os.environ, "SLURM_CONF": str(base / "slurm.conf"),
               "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        cluster = SlurmCluster(base=base, env=env)
        yield cluster
        cluster.cancel_all()
    finally:
        subprocess.run(["bash", str(HERE / "slurm_down.sh"), str(base)], check=False)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
    """A random tiny Llama and one-digit sums (no warm start: these tests check launching, not learning)."""
    root = tmp_path_factory.mktemp("cluster_assets")
    tokenizer = build_tiny_tokenizer([f"What is {a} + {b}? #### {a + b}" for a, b in SUMS])
    model_dir = build_tiny_model_dir(root / "model", tokenizer=tokenizer, tie_word_embeddings=True)
    train_file = root / "train.jsonl"
    train_file.write_text("".join(json.dumps({"prompt": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n"
                                  for a, b in SUMS))
    return TinyRun(model_dir=model_dir, train_file=train_file)
