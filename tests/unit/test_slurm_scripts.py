"""The Slurm model scripts are thin and consistent: a requeueable job that warns the batch shell before its time
limit, logs under logs/, and a default CONFIG whose cluster shape is the allocation's. The launcher refuses to run
outside an allocation. (tests/cluster runs the launcher itself under a real Slurm.)"""

import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from cipo_nemo.config import load_config

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = {
    "cipo_70b.sh": ("conf/cipo_llama3_70b_math.yaml", 8),
    "grpo_70b.sh": ("conf/grpo_llama3_70b_math.yaml", 8),
    "cipo_qwen3_4b_math.sh": ("conf/cipo_qwen3_4b_math.yaml", 1),
    "cipo_seed_coder_8b_code.sh": ("conf/cipo_seed_coder_8b_code.yaml", 2),
}


def _sbatch_options(text: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, flags=re.M)) | {
        flag: "" for flag in re.findall(r"^#SBATCH --([\w-]+)$", text, flags=re.M)}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_model_script(name):
    config, nodes = SCRIPTS[name]
    text = (REPO / "slurm" / name).read_text()
    subprocess.run(["bash", "-n", str(REPO / "slurm" / name)], check=True)
    options = _sbatch_options(text)
    assert int(options["nodes"]) == nodes
    assert re.fullmatch(r"B:USR1@\d+", options["signal"])
    assert "requeue" in options and options["open-mode"] == "append"
    # the whole node: every GPU and all of its memory (vLLM's pinned buffers, the refit file in /dev/shm)
    assert "exclusive" in options and options["mem"] == "0"
    assert options["output"].startswith("logs/")
    assert f"export CONFIG=${{CONFIG:-{config}}}" in text  # CONFIG=... sbatch ... overrides it
    assert 'slurm/ray_on_slurm.sh" "$@"' in text
    cfg = load_config(REPO / config, [])
    assert (cfg.cluster.num_nodes, cfg.cluster.devices_per_node) == (nodes, int(options["gpus-per-node"]))


def test_fp8_variant_has_the_70b_shape():
    cfg = load_config(REPO / "conf/cipo_llama3_70b_math_fp8.yaml", [])
    assert (cfg.cluster.num_nodes, cfg.cluster.devices_per_node) == (8, 8)


def test_launcher_refuses_outside_an_allocation():
    env = {"PATH": "/usr/bin:/bin", "CONFIG": "conf/cipo_base.yaml"}
    result = subprocess.run(["bash", str(REPO / "slurm" / "ray_on_slurm.sh")], env=env, capture_output=True, text=True)
    assert result.returncode == 1 and "inside a Slurm allocation" in result.stderr


# ----- the launcher's steps, with stand-ins for srun, scontrol and the Python it starts (no Slurm, no Ray)

FAKE_SRUN = r"""#!/bin/bash
# Record the step (its arguments, the open-files limit it inherited, whether the Ray head was up), then act it out.
# One write per record: steps started together append concurrently, and separate writes interleaved their lines.
# One line per step: the newlines of a `python -c` program become spaces.
printf '%s\t%s\t%s\n' "$(ulimit -n)" "$([ -e "$FAKE_DIR/head_up" ] && echo head-up || echo head-down)" "$(printf '%s ' "$@" | tr '\n' ' ')" >> "$FAKE_DIR/srun.log"
printf '%s\n' "${RAY_AUTH_TOKEN:-none}" >> "$FAKE_DIR/srun_tokens.log"
case " $* " in
    *" -c "*) echo 41001 41002 41003 41004 5ec2e7 ;;  # the job's Python in the container: ports and a token
    *" start --head "*) sleep 0.5; touch "$FAKE_DIR/head_up"; echo "Ray runtime started."; exec sleep 300 ;;
    *ray_worker.sh*) exec sleep 300 ;;
esac
exit 0
"""
FAKE_PYTHON = r"""#!/bin/bash
printf '%s\t%s\t%s\n' "$(ulimit -n)" "$([ -e "$FAKE_DIR/head_up" ] && echo head-up || echo head-down)" "$(printf '%s ' "$@")" >> "$FAKE_DIR/python.log"
case " $* " in
    *" -c "*) echo 41001 41002 41003 41004 5ec2e7 ;;
    *" start --head "*) sleep 0.5; touch "$FAKE_DIR/head_up"; echo "Ray runtime started."; exec sleep 300 ;;
esac
exit 0
"""


def _run_launcher(tmp_path: Path, *, nodes: list[str], gpus: int, container: bool,
                  auth: str = "disabled") -> tuple[str, list[str], list[str]]:
    """Run slurm/ray_on_slurm.sh to completion against the stand-ins; returns (launcher.log, srun steps, python calls)
    where each step line is `<open-files limit>\\t<head-up|head-down>\\t<arguments>`."""
    fake = tmp_path / "fake"
    fake.mkdir()
    for name, text in {"srun": FAKE_SRUN, "python": FAKE_PYTHON,
                       "scontrol": '#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && printf "%s\\n" $FAKE_NODES\n'}.items():
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    (fake / "srun.log").touch()
    (fake / "python.log").touch()
    env = {"PATH": f"{fake}:/usr/bin:/bin", "FAKE_DIR": str(fake), "FAKE_NODES": " ".join(nodes),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "ignored", "SLURMD_NODENAME": nodes[0],
           "CONFIG": "conf/cipo_base.yaml", "REPO_DIR": str(REPO), "PYTHON": str(fake / "python"),
           "LOG_ROOT": str(tmp_path / "logs"), "RAY_TMPDIR": str(tmp_path / "raytmp"), "RAY_HEAD_IP": "10.9.0.1",
           "RAY_AUTH_MODE": auth, "GPUS_PER_NODE": str(gpus), "DEVICES_PER_NODE": str(max(gpus, 1)),
           "CPUS_PER_NODE": "4", "RAY_NODES_TIMEOUT_S": "20"}
    if container:
        env |= {"CONTAINER_IMAGE": "/images/cipo.sqsh", "CONTAINER_MOUNTS": "/data:/data"}
    # started with a low soft open-files limit (a common login-node default), which the launcher must raise
    result = subprocess.run(["bash", str(REPO / "slurm" / "ray_on_slurm.sh"), "grpo.num_steps=1"], env=env,
                            capture_output=True, text=True, timeout=60, preexec_fn=_low_open_files_limit)
    launcher = (tmp_path / "logs" / "4242" / "launcher.log").read_text()
    assert result.returncode == 0, result.stdout + result.stderr
    return launcher, (fake / "srun.log").read_text().splitlines(), (fake / "python.log").read_text().splitlines()


def _low_open_files_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


def _expected_open_files() -> int:
    """65535 where a process may set it (a hard limit that high, or the right to raise it), else the hard limit."""
    probe = subprocess.run([sys.executable, "-c", "import resource; resource.setrlimit(resource.RLIMIT_NOFILE, "
                            "(65535, 65535))"], capture_output=True)
    return 65535 if probe.returncode == 0 else resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def test_launcher_container_steps_share_ray_tmpdir_and_ask_for_gpus(tmp_path):
    launcher, steps, _ = _run_launcher(tmp_path, nodes=["n1", "n2"], gpus=8, container=True)
    assert "driver exited with status 0" in launcher
    # dry run, ports, head, workers, wait for nodes, driver: every one an srun step in the container with the GPUs
    assert len(steps) == 6
    ray_tmp = str(tmp_path / "raytmp")
    for step in steps:
        limit, _, args = step.split("\t")
        assert "--gres=gpu:8" in args
        assert "--container-image=/images/cipo.sqsh" in args and "--container-name=cipo-4242" in args
        # Ray's sockets live under RAY_TMPDIR: the same host path in every step's container (each has its own /tmp)
        assert f"--container-mounts={REPO}:{REPO},{ray_tmp}:{ray_tmp},/data:/data" in args
        assert int(limit) == _expected_open_files()
    assert f"open files limit {_expected_open_files()}" in launcher
    head = next(s for s in steps if " start --head " in s)
    assert "--nodelist=n1" in head
    # the workers start once the head is up, through the script that waits for its port and retries
    workers = next(s for s in steps if "ray_worker.sh" in s)
    assert workers.split("\t")[1] == "head-up"
    assert "--exclude=n1" in workers and "10.9.0.1:41001" in workers


def test_launcher_without_gpus_asks_for_no_gres(tmp_path):
    _, steps, _ = _run_launcher(tmp_path, nodes=["n1"], gpus=0, container=True)
    assert len(steps) == 5 and not any("--gres" in step for step in steps)


def test_container_mode_runs_no_python_on_the_bare_host(tmp_path):
    """The free ports and the auth token come from the container's Python (the host may have none)."""
    launcher, steps, host_calls = _run_launcher(tmp_path, nodes=["n1", "n2"], gpus=8, container=True, auth="token")
    assert "driver exited with status 0" in launcher
    assert host_calls == []
    (values,) = [step for step in steps if " -c " in step]
    assert "--container-image=/images/cipo.sqsh" in values and "--nodelist=n1" in values
    head = next(s for s in steps if " start --head " in s)
    assert "--port=41001" in head and "--dashboard-port=41003" in head
    tokens = (tmp_path / "fake" / "srun_tokens.log").read_text().split()
    assert tokens[:2] == ["none", "none"] and set(tokens[2:]) == {"5ec2e7"}  # dry run, ports; then every step


def test_launcher_without_container_runs_the_head_here_and_workers_with_gres(tmp_path):
    launcher, steps, calls = _run_launcher(tmp_path, nodes=["n1", "n2", "n3"], gpus=4, container=False)
    assert len(steps) == 1  # only the workers are an srun step; the head, dry run and driver run in this shell
    limit, head_state, args = steps[0].split("\t")
    assert "--gres=gpu:4" in args and "--nodes=2" in args and "--container" not in args and head_state == "head-up"
    limits = [int(call.split("\t")[0]) for call in calls if re.match(r"\d+\t", call)]  # (-c code spans lines)
    assert len(limits) >= 4 and set(limits) == {_expected_open_files()}  # ports, dry run, head, wait, driver
