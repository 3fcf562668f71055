"""Keeps the fast loop (`pytest -m "not slow"`) honest: a test not marked `slow` fails when it starts a real worker.

Both detectors below count only what starts while a test without the `slow` marker runs (its setup, call and
teardown, module fixtures included), so a slow test's worker that is still alive is not held against the next one.

- In this process: an audit hook (`sys.addaudithook`) sees every process the interpreter creates through
  `subprocess`, `os.posix_spawn`, `os.exec*` and `os.fork`, and a wrapper of `multiprocessing.util.spawnv_passfds`
  sees the `spawn` and `forkserver` start methods, which raise no audit event. A new process is a worker when the
  Python code that creates it belongs to vLLM, Ray, torch's multiprocessing spawn (the gloo ranks of
  tests/functional/multirank.py) or torchrun (WORKER_MODULES), or when the program it runs is a worker program
  (WORKER_PROGRAMS: torchrun, Slurm's commands and daemons, Ray's daemons).
- Below this process: a thread reads the command lines of this process's descendants every `interval_s` and
  counts a new one that carries a worker's title (WORKER_TITLES: a vLLM engine core names itself VLLM::EngineCore,
  Ray's processes raylet, gcs_server and ray::...), e.g. a CLI run in a subprocess that starts Ray or vLLM. These
  processes live for seconds at least; the interval does not miss them.

Not seen: an engine or a rank that runs inside the test's own process and creates no process (vLLM with
VLLM_ENABLE_V1_MULTIPROCESSING=0 outside a Ray actor, a one-rank gloo group initialized in the test process).
"""

from __future__ import annotations

import multiprocessing.util
import os
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

import psutil

WORKER_MODULES = ("vllm", "ray", "torch.multiprocessing.spawn", "torch.distributed.run",
                  "torch.distributed.elastic")
WORKER_PROGRAMS = {"torchrun", "sbatch", "srun", "salloc", "slurmctld", "slurmd", "raylet", "gcs_server"}
WORKER_TITLES = ("VLLM::", "raylet", "gcs_server", "ray::", "torchrun", "torch.distributed.run", "slurmctld",
                 "slurmd")
PROCESS_EVENTS = {"subprocess.Popen", "os.posix_spawn", "os.exec", "os.fork", "os.forkpty"}


def worker_program(argv: Iterable[str], programs: Iterable[str] = WORKER_PROGRAMS) -> str | None:
    """The worker program `argv` runs (torchrun, srun, ...), or None."""
    args = [str(arg) for arg in argv]
    if not args:
        return None
    if Path(args[0]).name in set(programs):
        return Path(args[0]).name
    if Path(args[0]).name == "ray" and "start" in args[1:]:
        return "ray start"
    for flag, module in zip(args, args[1:]):
        if flag == "-m" and module in ("torch.distributed.run", "torch.distributed.launch"):
            return f"python -m {module}"
    return None


def worker_code_on_stack(frame, modules: Iterable[str] = WORKER_MODULES) -> str | None:
    """'module (file:line)' of the innermost frame on the stack that belongs to a worker library, or None."""
    roots = tuple(modules)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if any(module == root or module.startswith(root + ".") for root in roots):
            return f"{module} ({Path(frame.f_code.co_filename).name}:{frame.f_lineno})"
        frame = frame.f_back
    return None


def worker_title(command_line: str, titles: Iterable[str] = WORKER_TITLES) -> str | None:
    return next((title for title in titles if title in command_line), None)


class WorkerGuard:
    """Records the workers started while `watch(test_id)` is on; `take()` hands them over once. The signatures
    default to the real workers' (a test of the guard itself passes made-up ones)."""

    def __init__(self, interval_s: float = 0.25, *, modules: Iterable[str] = WORKER_MODULES,
                 programs: Iterable[str] = WORKER_PROGRAMS, titles: Iterable[str] = WORKER_TITLES) -> None:
        self.interval_s = interval_s
        self.modules, self.programs, self.titles = tuple(modules), frozenset(programs), tuple(titles)
        self._lock = threading.Lock()
        self._test_id: str | None = None
        self._found: list[str] = []
        self._known_descendants: set[tuple[int, float]] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ----- installation (once per session; an audit hook cannot be removed, it does nothing while off)

    def install(self) -> None:
        sys.addaudithook(self._audit)
        original = multiprocessing.util.spawnv_passfds

        def spawnv_passfds(path, args, passfds):
            self._process_created(args, sys._getframe(1))
            return original(path, args, passfds)

        multiprocessing.util.spawnv_passfds = spawnv_passfds

    def _audit(self, event: str, args: tuple) -> None:
        if event not in PROCESS_EVENTS or self._test_id is None:
            return
        if event == "subprocess.Popen":  # (executable, args, cwd, env); args is one string with shell=True
            argv = str(args[1]).split() if isinstance(args[1], (str, bytes, os.PathLike)) else list(args[1] or [])
        elif event in ("os.posix_spawn", "os.exec"):
            argv = list(args[1] or [])
        else:  # a fork runs this program's own code: only the stack says whose
            argv = []
        self._process_created(argv, sys._getframe(1))

    def _process_created(self, argv: Iterable, frame) -> None:
        if self._test_id is None:
            return
        program = worker_program((str(arg) for arg in argv), self.programs)
        code = None if program else worker_code_on_stack(frame, self.modules)
        if program or code:
            self._record(f"started {program}" if program else f"started a process from {code}")

    # ----- one test

    def watch(self, test_id: str) -> None:
        self._known_descendants = set(self._descendants())
        with self._lock:
            self._test_id, self._found = test_id, []
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch_descendants, name="worker-guard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        with self._lock:
            self._test_id = None

    def take(self) -> list[str]:
        """The workers found since the last call (the descendants are looked at once more first)."""
        if self._test_id is not None:
            self._check_descendants()
        with self._lock:
            found, self._found = self._found, []
        return found

    def _record(self, what: str) -> None:
        with self._lock:
            if what not in self._found:
                self._found.append(what)

    def _watch_descendants(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._check_descendants()

    def _descendants(self) -> dict[tuple[int, float], psutil.Process]:
        found = {}
        try:
            children = psutil.Process().children(recursive=True)
        except psutil.Error:
            return found
        for child in children:
            try:
                found[(child.pid, child.create_time())] = child
            except psutil.Error:  # it ended while we listed it
                continue
        return found

    def _check_descendants(self) -> None:
        for key, process in self._descendants().items():
            if key in self._known_descendants:
                continue
            try:
                command_line = " ".join(process.cmdline()) or process.name()
            except psutil.Error:
                continue
            title = worker_title(command_line, self.titles)
            if title is not None:
                self._known_descendants.add(key)
                self._record(f"a descendant process runs {title} (pid {key[0]}: {command_line[:80]})")
