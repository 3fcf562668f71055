"""NeMo-Run recipes for cipo_nemo: one per preset, each launching the same entry point as `python -m cipo_nemo`.

    python recipes/cipo.py --preset llama3_70b_math --dry-run                       # print the sbatch script
    python recipes/cipo.py --preset llama3_70b_math --account ACC --partition P     # submit (on the login node)
    python recipes/cipo.py --preset smollm2_cpu --executor local                    # run here, in a subprocess
    python recipes/cipo.py --preset qwen3_4b_math --dry-run -- grpo.num_steps=10    # overrides after `--`

The preset and the overrides are validated (`cipo_nemo.config.load_config`) before any job is rendered or submitted:
a bad override is one line on stderr and exit status 2, as with `python -m cipo_nemo`.

Local path: a `run.Script` running `python -m cipo_nemo --config <preset> <overrides>` from the repository under
`run.LocalExecutor` (one process; Ray starts in-process as in any local run).

Slurm path: `run.SlurmExecutor` submits a job whose batch shell is slurm/ray_on_slurm.sh with CONFIG=<preset> and the
overrides. That launcher, not NeMo-Run's own Ray-on-Slurm support (`run.ray` RayJob, which brings its own ray.sub
template), because then `sbatch slurm/<model>.sh` and this recipe run one and the same job: the launcher's dry run
before Ray starts, its Ray head/worker start-up, token auth and port choice, and its preemption protocol
(`--signal=B:USR1@300` to the batch shell -> checkpoint -> exit 75 -> `scontrol requeue`). Two Ray-on-Slurm scripts
would be two sets of behaviour to keep equal. NeMo-Run always wraps its task in `srun`, which would make the
launcher a job step: Slurm's `B:` signal would then miss it and its own srun calls would nest inside a step. So the
sbatch script's setup lines `exec` the launcher in the batch shell itself, and NeMo-Run's srun line after them
(the same command) is never reached. NeMo-Run still writes, submits and tracks the job (`run.Experiment`).

Assumptions of the Slurm path: it is submitted on the login node (`run.LocalTunnel`; an `run.SSHTunnel` works the same
from a laptop), the repository sits on a filesystem the nodes share at the same path (`run.Packager()`: no code
copy), and Python with cipo_nemo installed is `--python` on the nodes (or inside `--container-image`, which is
passed to the launcher as CONTAINER_IMAGE: it runs Ray and the driver in pyxis steps).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import nemo_run as run

from cipo_nemo.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "slurm" / "ray_on_slurm.sh"
PREEMPTION_SIGNAL = "B:USR1@300"  # Slurm signals the batch shell 5 min before the time limit: checkpoint, requeue


@dataclass(frozen=True)
class Preset:
    config: str  # relative to the repository
    nodes: int
    gpus_per_node: int  # 0: CPU-only (the launcher then needs DEVICES_PER_NODE)
    time: str  # Slurm time limit of one job attempt (requeued attempts resume from the last checkpoint)


PRESETS: dict[str, Preset] = {
    "llama3_70b_math": Preset("conf/cipo_llama3_70b_math.yaml", nodes=8, gpus_per_node=8, time="04:00:00"),
    "llama3_70b_math_fp8": Preset("conf/cipo_llama3_70b_math_fp8.yaml", nodes=8, gpus_per_node=8, time="04:00:00"),
    "grpo_llama3_70b_math": Preset("conf/grpo_llama3_70b_math.yaml", nodes=8, gpus_per_node=8, time="04:00:00"),
    "qwen3_4b_math": Preset("conf/cipo_qwen3_4b_math.yaml", nodes=1, gpus_per_node=8, time="04:00:00"),
    "seed_coder_8b_code": Preset("conf/cipo_seed_coder_8b_code.yaml", nodes=2, gpus_per_node=8, time="04:00:00"),
    "smollm2_cpu": Preset("conf/cipo_smollm2_cpu.yaml", nodes=1, gpus_per_node=0, time="01:00:00"),
}


def entry_command(preset: Preset, overrides: list[str], *, python: str = sys.executable) -> list[str]:
    """The one entry point every path runs: `python -m cipo_nemo --config <preset> <overrides>`."""
    return [python, "-m", "cipo_nemo", "--config", preset.config, *overrides]


# ----------------------------------------------------------------------------------------------- local


def local_recipe(
    preset: Preset, overrides: list[str], *, python: str = sys.executable
) -> tuple[run.Script, run.LocalExecutor]:
    """The entry point in a subprocess here; `cd` first so the presets' relative paths (data, results) resolve."""
    command = " ".join(shlex.quote(part) for part in entry_command(preset, overrides, python=python))
    task = run.Script(inline=f"cd {shlex.quote(str(REPO))} && exec {command}")
    return task, run.LocalExecutor(ntasks_per_node=1, env_vars={"PYTHONUNBUFFERED": "1"})


# ----------------------------------------------------------------------------------------------- slurm


def launcher_call(preset: Preset, overrides: list[str]) -> str:
    """`bash slurm/ray_on_slurm.sh <overrides>` as one shell line, overrides quoted once, here (CONFIG comes from
    the job's environment)."""
    return " ".join(["bash", shlex.quote(str(LAUNCHER)), *(shlex.quote(o) for o in overrides)])


def slurm_recipe(
    preset: Preset,
    overrides: list[str],
    *,
    account: str,
    partition: str | None,
    job_dir: str,
    python: str = "python",
    container_image: str | None = None,
    container_mounts: str | None = None,
    time: str | None = None,
) -> tuple[run.Script, run.SlurmExecutor]:
    """The launcher as the job's batch shell (see the module docstring for why it is exec'd in the setup lines)."""
    env = {"CONFIG": preset.config, "PYTHON": python}
    if preset.gpus_per_node == 0:
        env["DEVICES_PER_NODE"] = "1"  # CPU-only: one worker process per node
    if container_image:
        env |= {"CONTAINER_IMAGE": container_image, "CONTAINER_MOUNTS": container_mounts or ""}
    Path(job_dir).mkdir(parents=True, exist_ok=True)  # nemo-run mangles the log paths of a job dir that is absent
    call = launcher_call(preset, overrides)
    setup = "\n".join([
        "# cipo_nemo: slurm/ray_on_slurm.sh must be the batch shell itself (it receives --signal=B:USR1 and runs one",
        "# srun per Ray role), so it replaces this shell here; NeMo-Run's srun command below is never reached.",
        f"cd {shlex.quote(str(REPO))}",
        f"exec {call}",
    ])
    executor = run.SlurmExecutor(
        account=account,
        partition=partition,
        nodes=preset.nodes,
        ntasks_per_node=1,
        gpus_per_node=preset.gpus_per_node or None,
        exclusive=True,
        time=time or preset.time,
        env_vars=env,
        setup_lines=setup,
        additional_parameters={"signal": PREEMPTION_SIGNAL},
        job_name_prefix="cipo_nemo.",
        packager=run.Packager(),  # the repository is on a shared filesystem: nothing is copied
        tunnel=run.LocalTunnel(job_dir=job_dir),
    )
    task = run.Script(inline=f"cd {shlex.quote(str(REPO))} && exec {call}")
    return task, executor


def render_sbatch(task: run.Script, executor: run.SlurmExecutor, *, name: str) -> str:
    """The sbatch script NeMo-Run would submit, rendered without a cluster (a dry run of the experiment)."""
    with run.Experiment(name, executor=executor, log_level="WARN") as experiment:
        experiment.add(task, name=name)
        experiment.dryrun(log=False)
        request = experiment.jobs[0]._dryrun_info.request  # SlurmBatchRequest (nemo-run 0.11)
    return f"# submitted with: {' '.join(request.launch_cmd)} <script>\n" + request.materialize()


# ----------------------------------------------------------------------------------------------- run


def run_local(task: run.Script, executor: run.LocalExecutor, *, name: str) -> str:
    """Run to completion; returns the final state (e.g. SUCCEEDED, FAILED) as NeMo-Run reports it."""
    with run.Experiment(name, executor=executor, log_level="WARN") as experiment:
        experiment.add(task, name=name)
        experiment.run(sequential=True, tail_logs=False)
    # leaving the `with` waits for the job; Job.wait stored torchx's final AppState (experiment.status() would ask
    # the local scheduler again, which often answers UNKNOWN)
    return experiment.jobs[0].state.name


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--executor", choices=["slurm", "local"], default="slurm")
    parser.add_argument("--dry-run", "--dryrun", dest="dry_run", action="store_true",
                        help="print the sbatch script (slurm) or the command (local)")
    parser.add_argument("--account", default="ACCOUNT", help="Slurm account")
    parser.add_argument("--partition", default=None, help="Slurm partition")
    parser.add_argument("--time", default=None, help="Slurm time limit (default: the preset's)")
    parser.add_argument("--job-dir", default=str(REPO / "logs" / "nemo_run"), help="where NeMo-Run keeps job files")
    parser.add_argument("--python", default="python", help="Python on the nodes (Slurm); here: this interpreter")
    parser.add_argument("--container-image", default=None, help="pyxis image for Ray and the driver (Slurm)")
    parser.add_argument("--container-mounts", default=None, help="pyxis mounts (Slurm)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (after --)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset, name = PRESETS[args.preset], args.preset
    try:  # a bad override stops here, not after the Slurm queue
        load_config(REPO / preset.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}".replace("\n", "\nconfig error: "), file=sys.stderr)
        return 2
    if args.executor == "local":
        task, executor = local_recipe(preset, args.overrides)
        if args.dry_run:
            print(task.inline)
            return 0
        state = run_local(task, executor, name=name)
        print(f"{name}: {state}")
        return 0 if state == "SUCCEEDED" else 1
    task, executor = slurm_recipe(preset, args.overrides, account=args.account, partition=args.partition,
                                  job_dir=args.job_dir, python=args.python, time=args.time,
                                  container_image=args.container_image, container_mounts=args.container_mounts)
    if args.dry_run:
        print(render_sbatch(task, executor, name=name))
        return 0
    with run.Experiment(name, executor=executor) as experiment:
        experiment.add(task, name=name)
        experiment.run(detach=True)  # the job outlives this process; `experiment.status()` / squeue follow it
    return 0


if __name__ == "__main__":
    sys.exit(main())
