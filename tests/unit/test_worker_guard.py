"""tests/worker_guard.py, which fails a test not marked slow that starts a real worker: what it counts as a worker
start, seen through each of its detectors. The guard under test watches made-up signatures, so that the session's
own guard (tests/conftest.py), which watches the real ones, has nothing to object to here."""

from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from worker_guard import WorkerGuard, worker_code_on_stack, worker_program, worker_title


def run_as_module(module: str, source: str, **names):
    """Run `source`'s function `run` with `module` as its module name: the stack then shows that module's code."""
    namespace = {"__name__": module, **names}
    exec(compile(source, f"<{module}>", "exec"), namespace)
    return namespace["run"]()


@pytest.mark.parametrize(("argv", "program"), [
    (["/usr/bin/srun", "-n", "2", "python"], "srun"),
    (["torchrun", "--nproc-per-node", "2", "train.py"], "torchrun"),
    ([sys.executable, "-m", "torch.distributed.run", "x.py"], "python -m torch.distributed.run"),
    (["/venv/bin/ray", "start", "--head"], "ray start"),
    (["/site-packages/ray/core/src/ray/gcs/gcs_server", "--port=1"], "gcs_server"),
    ([sys.executable, "-m", "cipo_nemo", "--dry-run"], None),
    (["bash", "-c", "echo srun"], None),
    ([], None),
])
def test_worker_programs(argv: list[str], program: str | None) -> None:
    assert worker_program(argv) == program


def test_worker_code_is_found_anywhere_on_the_stack() -> None:
    frame = run_as_module("vllm.v1.engine.core_client", "import sys\ndef run():\n    return sys._getframe()\n")
    assert worker_code_on_stack(frame).startswith("vllm.v1.engine.core_client (<vllm.v1.engine.core_client>:3)")
    frame = run_as_module("torch.multiprocessing.spawn", "import sys\ndef run():\n    return sys._getframe()\n")
    assert worker_code_on_stack(frame).startswith("torch.multiprocessing.spawn")
    for innocent in ("vllm_like", "rays", "cipo_nemo.distributed.cluster", "torch.multiprocessing"):
        frame = run_as_module(innocent, "import sys\ndef run():\n    return sys._getframe()\n")
        assert worker_code_on_stack(frame) is None, innocent


def test_worker_titles() -> None:
    assert worker_title("VLLM::EngineCore_0") == "VLLM::"
    assert worker_title("ray::WorkerHost.run") == "ray::"
    assert worker_title("/venv/lib/ray/core/src/ray/raylet/raylet --node_ip_address=127.0.0.1") == "raylet"
    assert worker_title("python -m cipo_nemo.eval --model m") is None


@pytest.fixture
def guard():
    probe = WorkerGuard(interval_s=0.05, modules=("fake_worker_lib",), programs=("fake-srun",),
                        titles=("fake-worker-title",))
    probe.install()
    probe.watch("probe")
    yield probe
    probe.stop()


def test_a_process_created_by_worker_code_is_seen_through_subprocess(guard: WorkerGuard) -> None:
    subprocess.run([sys.executable, "-c", "pass"], check=True)  # the test's own code: not a worker
    assert guard.take() == []
    run_as_module("fake_worker_lib.engine", "def run():\n    subprocess.run([sys.executable, '-c', 'pass'])\n",
                  subprocess=subprocess, sys=sys)
    (found,) = guard.take()
    assert found.startswith("started a process from fake_worker_lib.engine")


def test_the_spawn_start_method_is_seen(guard: WorkerGuard) -> None:
    run_as_module("fake_worker_lib.ranks", "def run():\n    process = multiprocessing.get_context('spawn')"
                  ".Process(target=print)\n    process.start()\n    process.join()\n", multiprocessing=multiprocessing)
    (found,) = guard.take()
    assert found.startswith("started a process from fake_worker_lib.ranks")


def test_a_worker_program_is_seen_even_when_it_does_not_start(guard: WorkerGuard) -> None:
    with pytest.raises(FileNotFoundError):
        subprocess.run(["/nonexistent/fake-srun", "-n", "2"])
    assert guard.take() == ["started fake-srun"]


def test_a_descendant_with_a_worker_title_is_seen_and_an_old_one_is_not(guard: WorkerGuard) -> None:
    # a child that starts a grandchild titled like a worker, as a CLI run starts Ray: only the watcher sees it
    child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.run([sys.executable, '-c', "
                              "'import time; time.sleep(0.5)', 'fake-worker-' + 'title'])"])  # only the grandchild
    child.wait()
    found = guard.take()
    assert len(found) == 1 and "runs fake-worker-title" in found[0]
    guard.stop()
    old = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)", "fake-worker-title"])
    try:
        time.sleep(0.3)
        guard.watch("next")  # alive before the next test starts: not that test's worker
        time.sleep(0.2)
        assert guard.take() == []
    finally:
        old.kill()
        old.wait()


def test_nothing_is_recorded_while_not_watching(guard: WorkerGuard) -> None:
    guard.stop()
    run_as_module("fake_worker_lib.engine", "def run():\n    subprocess.run([sys.executable, '-c', 'pass'])\n",
                  subprocess=subprocess, sys=sys)
    assert guard.take() == []


INNER_TESTS = '''
import subprocess
import sys

import pytest


def start_a_process_from_vllm_code():
    namespace = {"__name__": "vllm.v1.engine.lookalike", "subprocess": subprocess, "sys": sys}
    exec(compile("def run():\\n    subprocess.run([sys.executable, '-c', 'pass'])\\n", "<lookalike>", "exec"), namespace)
    namespace["run"]()


def test_fast_but_starts_one():
    start_a_process_from_vllm_code()


@pytest.mark.slow
def test_marked_slow():
    start_a_process_from_vllm_code()


def test_starts_nothing():
    subprocess.run([sys.executable, "-c", "pass"])
'''


def test_the_session_guard_fails_an_unmarked_test_that_starts_a_worker(tmp_path) -> None:
    """tests/conftest.py's hooks, in a pytest session of their own: the real signatures, code that looks like
    vLLM's (a module named vllm.*) creating a process."""
    (tmp_path / "test_inner.py").write_text(INNER_TESTS)
    tests_dir = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q",
                             "-rA", "-W", "ignore::pytest.PytestUnknownMarkWarning", str(tmp_path)],
                            cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": f"{tests_dir}"
                            f"{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}, timeout=120)
    outcomes = {test: outcome for outcome, test in re.findall(r"^(PASSED|FAILED) \S+::(\w+)", result.stdout, re.M)}
    assert outcomes == {"test_fast_but_starts_one": "FAILED", "test_marked_slow": "PASSED",
                        "test_starts_nothing": "PASSED"}, result.stdout[-3000:] + result.stderr[-2000:]
    assert "is not marked slow, but during its call it started a process from vllm.v1.engine.lookalike" in \
        result.stdout
