"""The asynchronous loop on the real stack, vLLM engine and Megatron policy on their own Ray bundles and cores
(generation.colocated false, async.enabled, max_trajectory_age 1), tiny model, 4 steps:

- an uninterrupted run samples batch s with weight version max(0, s-2), and while it runs every thread of the
  policy's actor is bound to the first core and every thread of the generation actor, its engine core and the
  engine's worker to the second (/proc/<pid>/task/*/status, Cpus_allowed_list);
- an engine core frozen by SIGSTOP (a real stall) ends the run with one line and exit 75 within a bounded time,
  and the rerun from the checkpoint, which samples again what was in flight, ends where the uninterrupted run ends;
- an engine core killed while the run overlaps is replaced in place (a new engine, refit, the batch sampled again)
  and the run finishes without a requeue.
The kill-anywhere-and-resume equality of the schedule itself is tested on the HF backends (test_async_loop.py)."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from test_loop_hf import _records
from test_loop_stack import FOUR_STEPS, REPO, _assert_resumed_run_matches, _cli, _processes, _run, _shm_files

from cipo_nemo.loop import REQUEUE_EXIT_CODE

pytestmark = pytest.mark.slow  # the training loop on Megatron, vLLM and Ray

APART = ("generation.colocated=false", "cluster.generation_devices_per_node=1", "async.enabled=true")
MAX_WAIT_S = 20


def _descendants(pid: int, table: dict[int, tuple[int, bytes]]) -> list[int]:
    children = [child for child, (parent, _) in table.items() if parent == pid]
    return children + [grandchild for child in children for grandchild in _descendants(child, table)]


def _thread_cores(pid: int) -> set[str]:
    """Cpus_allowed_list of every thread of `pid`."""
    cores = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:
            continue
        cores.add(next(line.split()[1] for line in status.splitlines() if line.startswith("Cpus_allowed_list")))
    return cores


class Run:
    """`python -m cipo_nemo` on the async stack in its own session, and every process it started (its tree is
    recorded while it runs: Ray's daemons, the actors, vLLM's processes), so that only those are ended after it."""

    def __init__(self, model, run_dir: Path, tmp_path: Path, *extra: str) -> None:
        self.shm_before, self.tree = _shm_files(), set()
        self.stdout, self.stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        with self.stdout.open("w") as stdout, self.stderr.open("w") as stderr:
            self.process = subprocess.Popen(_cli(model, run_dir, *APART, *FOUR_STEPS, *extra), cwd=REPO,
                                            stdout=stdout, stderr=stderr, start_new_session=True)

    def record_tree(self) -> dict[int, tuple[int, bytes]]:
        table = _processes()
        self.tree |= set(_descendants(self.process.pid, table))
        return table

    def wait_for(self, path: Path, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while not path.exists():
            assert self.process.poll() is None, f"the run ended before writing {path}"
            assert time.monotonic() < deadline, f"{path} did not appear within {timeout_s} s"
            self.record_tree()
            time.sleep(0.02)

    def wait(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while self.process.poll() is None and time.monotonic() < deadline:
            self.record_tree()
            time.sleep(0.2)
        return self.process.wait(timeout=1)

    def sides(self) -> tuple[int, int, list[int]]:
        """(policy actor, generation actor, the processes of its vLLM engine)."""
        table = self.record_tree()
        actors = [pid for pid in _descendants(self.process.pid, table) if table[pid][1].startswith(b"ray::_WorkerHost")]
        engines = {actor: [pid for pid in _descendants(actor, table) if table[pid][1].startswith(b"VLLM::")]
                   for actor in actors}
        (generation,) = [actor for actor in actors if engines[actor]]
        (policy,) = [actor for actor in actors if actor != generation]
        return policy, generation, engines[generation]

    def engine_core(self) -> int:
        table = self.record_tree()
        (core,) = [pid for pid in _descendants(self.process.pid, table) if b"EngineCore" in table[pid][1]]
        return core

    def end(self) -> None:
        """Whatever happened: no process of the run (a frozen engine core included) and no queue file outlives it."""
        if self.process.poll() is None:
            self.record_tree()
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        for pid in self.tree:  # outside the driver's process group: Ray's daemons, actors and their children
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for path in _shm_files() - self.shm_before:  # a killed engine core could not remove its queues
            path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def async_run(arithmetic_model, tmp_path_factory) -> tuple[Path, dict]:
    """The uninterrupted 4-step run, and the cores each side's processes were bound to while it ran."""
    tmp_path = tmp_path_factory.mktemp("async_straight")
    run_dir = tmp_path / "run"
    run = Run(arithmetic_model, run_dir, tmp_path)
    try:
        run.wait_for(run_dir / "checkpoints" / "step_000001" / "COMPLETE")
        policy, generation, engine = run.sides()
        cores = {"policy": _thread_cores(policy), "generation": _thread_cores(generation),
                 "engine": set().union(*(_thread_cores(pid) for pid in engine)), "engine_processes": len(engine)}
        assert run.wait(timeout_s=600) == 0, run.stderr.read_text()[-6000:]
    finally:
        run.end()
    return run_dir, cores


def test_one_step_off_on_cores_of_their_own(async_run):
    run_dir, cores = async_run
    records = _records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["async/sampled_by_version"] for r in records] == [0, 0, 1, 2]
    assert [r["async/trajectory_age"] for r in records] == [0, 1, 1, 1]
    assert all(r["train/token_mult_prob_error"] < 1.5 for r in records)  # one version apart, tiny steps
    first, second = (str(core) for core in sorted(os.sched_getaffinity(0))[:2])
    assert cores["policy"] == {first}, cores
    assert cores["generation"] == cores["engine"] == {second}, cores
    assert cores["engine_processes"] >= 1


def test_a_stalled_engine_stops_the_run_in_bounded_time_and_the_rerun_matches(arithmetic_model, async_run, tmp_path):
    straight_dir, _ = async_run
    run_dir = tmp_path / "stall"
    run = Run(arithmetic_model, run_dir, tmp_path, f"async.max_wait_s={MAX_WAIT_S}")
    try:
        run.wait_for(run_dir / "checkpoints" / "step_000001" / "COMPLETE")
        os.kill(run.engine_core(), signal.SIGSTOP)  # alive, holding its queues, doing nothing
        frozen = time.monotonic()
        returncode = run.wait(timeout_s=MAX_WAIT_S + 120)  # a stall must end the run, not hang it
        stopped_after = time.monotonic() - frozen
    finally:
        run.end()
    output = run.stdout.read_text()
    assert returncode == REQUEUE_EXIT_CODE, output[-3000:] + run.stderr.read_text()[-6000:]
    assert stopped_after < MAX_WAIT_S + 60  # the wait limit, then a quick shutdown of the stuck engine
    lines = [line for line in output.splitlines() if line.strip()]
    assert sum(line.startswith("generation stalled:") for line in lines) == 1, lines[-5:]
    last = lines[-1]
    assert last.startswith("generation stalled: ") and f"async.max_wait_s={MAX_WAIT_S}" in last, last
    assert "(step 2, stage " in last or "sampling batch 3" in last, last  # the step, and the stage it stalled in
    assert last.endswith("restart 1 of cluster.max_restarts=3; exit code 75: rerun the same command to resume"), last

    # the requeued job resumes from the last complete checkpoint, whose batch sampled ahead it trains first; a
    # stall found while the checkpoint of step 2 waited for batch 3 leaves step 2 logged twice
    _run(arithmetic_model, run_dir, *APART, *FOUR_STEPS)
    assert [r["step"] for r in _records(run_dir)][-2:] == [3, 4]
    _assert_resumed_run_matches(straight_dir, run_dir)


def test_a_killed_engine_is_replaced_in_place_and_the_run_finishes(arithmetic_model, tmp_path):
    run_dir = tmp_path / "death"
    run = Run(arithmetic_model, run_dir, tmp_path)
    try:
        run.wait_for(run_dir / "checkpoints" / "step_000001" / "COMPLETE")
        _, _, engine = run.sides()
        busy_before = sum(_cpu_ticks(pid) for pid in engine)
        deadline = time.monotonic() + 60
        while sum(_cpu_ticks(pid) for pid in engine) - busy_before < 20 and time.monotonic() < deadline:
            time.sleep(0.02)  # the engine works on step 2's refit or batch 3: the overlap
        os.kill(run.engine_core(), signal.SIGKILL)
        returncode = run.wait(timeout_s=600)
    finally:
        run.end()
    output = run.stdout.read_text()
    assert returncode == 0, output[-3000:] + run.stderr.read_text()[-6000:]
    assert "worker died" not in output and "generation stalled" not in output
    records = _records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["async/engine_restarts"] == 1
    assert all(r["async/trajectory_age"] <= 1 for r in records)
    assert "replacing it in place (engine restart 1 of cluster.max_engine_restarts=2)" in \
        (run_dir / "run.log").read_text()


def _cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime
