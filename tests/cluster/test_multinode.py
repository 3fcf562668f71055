"""The launcher on two simulated nodes (network namespaces n1, n2 with a slurmd each): the batched worker srun,
the wait for every node, and a Megatron policy with one rank per node (data parallel over gloo across the
namespaces). Heavier than tests/cluster/test_launcher.py and it edits /etc/hosts: runs only with
CIPO_TEST_MULTINODE=1."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from slurm_harness import HERE, SlurmCluster
from test_launcher import JOB_TIMEOUT_S, _describe, _overrides, _steps, _submit

pytestmark = [
    pytest.mark.cluster_multinode,
    pytest.mark.slow,  # real Slurm and Ray on two simulated nodes
    pytest.mark.skipif(os.environ.get("CIPO_TEST_MULTINODE") != "1", reason="set CIPO_TEST_MULTINODE=1 to run"),
]


@pytest.fixture(scope="module")
def two_nodes(slurm_cluster):  # the one-node fixture installs the packages and starts munged
    base = Path(tempfile.mkdtemp(prefix="cipo-sim-", dir="/tmp"))
    up = subprocess.run(["bash", str(HERE / "multinode_up.sh"), str(base)], capture_output=True, text=True)
    try:
        assert up.returncode == 0, f"multinode_up.sh failed:\n{up.stdout}\n{up.stderr}"
        cluster = SlurmCluster(base=base, env={**slurm_cluster.env, "SLURM_CONF": str(base / "slurm.conf")})
        yield cluster
        cluster.cancel_all()
    finally:
        subprocess.run(["bash", str(HERE / "multinode_down.sh"), str(base)], check=False)
        shutil.rmtree(base, ignore_errors=True)


def test_two_nodes_one_rank_each(two_nodes, tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    # No loopback pinning: the head binds n1's address (hostname --ip-address in n1), the worker dials it from n2.
    job_id, log_dir = _submit(two_nodes, tmp_path, _overrides(tiny_run, run_dir, 2),
                              env={"RAY_LOOPBACK": "0", "GLOO_SOCKET_IFNAME": "eth0"}, sbatch_args=("--nodes=2",))
    info = two_nodes.wait_until_done(job_id, JOB_TIMEOUT_S)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), _describe(two_nodes, job_id, log_dir)
    assert info["NodeList"] == "n[1-2]"
    launcher = (log_dir / "launcher.log").read_text()
    assert "Ray head on n1 at 10.200.0.11:" in launcher
    assert "Ray cluster ready: 2 node(s)" in launcher
    assert (log_dir / "ray-worker-n2.log").is_file()
    assert _steps(run_dir) == [1, 2]
    cluster = yaml.safe_load((run_dir / "config.yaml").read_text())["cluster"]
    assert (cluster["num_nodes"], cluster["devices_per_node"]) == (2, 1)
    # One Megatron rank ran in n2's Ray worker node.
    worker_logs = [p.read_text() for p in (two_nodes.base / f"ray-{job_id}-w0").glob("session_*/logs/worker-*.out")]
    assert any(":actor_name:_WorkerHost" in text and "megatron" in text for text in worker_logs)
