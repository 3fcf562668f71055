"""Run an untrusted Python program in an isolated, resource-limited child process.

Entry points: :func:`run_program` (one program) and :class:`SandboxPool` (many, with bounded concurrency).
Everything that executes model-written code in this project goes through here. Linux only. See
``docs/sandbox.md`` for the guarantees, the non-guarantees and measured costs.

This module is the public API and the parent side. The code that runs in the sandbox's own processes, and
with it how a run is isolated (namespaces, file system view, credentials, rlimits), is
:mod:`cipo_nemo.environments.sandbox_launcher`, which the parent compiles once and hands to each launcher as a
code object (see :func:`_launcher_code`). The parent's share: the wall clock (the run is killed
``timeout_s`` after the program's interpreter is up; start-up has its own ``_SETUP_TIMEOUT_S``), bounded
output buffers (the rest is spliced to /dev/null, so a program printing gigabytes costs the parent at most
``output_limit_bytes`` per stream), a dedicated uid leased per concurrent run when root, and the teardown:
``run_program`` returns only once every process of the run is gone.

If any isolation step fails, the program is not run and the result is ``sandbox_error``: the sandbox fails
closed and never falls back to running unsandboxed.

The program runs on the trainer's own interpreter binary (its real path, not the venv) in isolated mode without
the site module, ``python -I -S``: standard library only, no third-party packages.

Outcome mapping (``SandboxResult.status``): exit 0 -> ``ok``; other exit -> ``error``; killed at the wall
deadline or by RLIMIT_CPU -> ``timeout``; ``MemoryError`` (the wrapper exits with
``MEMORY_ERROR_EXIT_CODE``, or a nonzero exit whose stderr ends mentioning ``MemoryError``) -> ``memory``; any
other signal -> ``killed``; failure to set up, including an interpreter that cannot start -> ``sandbox_error``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import marshal
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from cipo_nemo.environments import sandbox_launcher
from cipo_nemo.environments.sandbox_cgroup import (
    CgroupLimits,
    RunCgroup,
    oom_killed,
    run_cgroup,
    sandbox_cgroup_base,
)
from cipo_nemo.environments.sandbox_launcher import LINK_SEPARATOR, MEMORY_ERROR_EXIT_CODE
from cipo_nemo.environments.sandbox_runtime import RuntimeView, runtime_view

STATUSES = ("ok", "error", "timeout", "memory", "killed", "sandbox_error")

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_MB = 1024
DEFAULT_OUTPUT_LIMIT_BYTES = 1 << 20
DEFAULT_MAX_PROCESSES = 64
DEFAULT_MAX_FILE_MB = 64
DEFAULT_CPU_CORES = 1.0
TRUNCATION_MARKER = "\n[cipo sandbox: output truncated, {dropped} more bytes dropped]\n"

# Dedicated uids for root mode, far above the ranges distributions and systemd hand out. One slot is leased
# per concurrent run; the lock is an abstract unix socket name, released when the lease ends or the process dies.
_SANDBOX_UID_BASE = 1_900_000_000
_SANDBOX_UID_SLOTS = 16_384
_SETUP_TIMEOUT_S = 60.0
_KILL_GRACE_S = 10.0
_READ_CHUNK = 1 << 20
_PIPE_SIZE = 1 << 20
_STATUS_LIMIT_BYTES = 1 << 16
_STDERR_TAIL_FOR_MEMORY = 2048
# The working directory holds one file of max_file_mb next to main.py and a few small files.
_WORKDIR_SLACK_BYTES = 1 << 20
_CGROUP_LAUNCHER_BYTES = 64 << 20  # the launcher's and the init's interpreters
_LAUNCHER_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one program.

    ``status`` is one of :data:`STATUSES`. ``returncode`` is the exit code, or minus the signal number that
    killed the program, or None when there is none (wall-clock timeout, set-up failure). ``stdout`` and
    ``stderr`` are decoded as UTF-8 (invalid bytes replaced), cut to the output limit with
    :data:`TRUNCATION_MARKER` appended; for ``sandbox_error``, stderr starts with ``sandbox: <what failed>``.
    ``wall_s`` is the time from spawning the sandbox to reaping it, start-up included.
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one run; see :func:`run_program` for their meaning and defaults."""

    timeout_s: float = DEFAULT_TIMEOUT_S
    memory_mb: int = DEFAULT_MEMORY_MB
    output_limit_bytes: int = DEFAULT_OUTPUT_LIMIT_BYTES
    max_processes: int = DEFAULT_MAX_PROCESSES
    max_file_mb: int = DEFAULT_MAX_FILE_MB
    cpu_time_s: int | None = None
    cpu_cores: float = DEFAULT_CPU_CORES

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.memory_mb < 32:
            raise ValueError(f"memory_mb must be >= 32 (the interpreter alone needs ~20 MB), got {self.memory_mb}")
        if self.output_limit_bytes < 0:
            raise ValueError(f"output_limit_bytes must be >= 0, got {self.output_limit_bytes}")
        if self.max_processes < 1:
            raise ValueError(f"max_processes must be >= 1, got {self.max_processes}")
        if self.max_file_mb < 1:
            raise ValueError(f"max_file_mb must be >= 1, got {self.max_file_mb}")
        if not self.cpu_cores > 0:
            raise ValueError(f"cpu_cores must be > 0, got {self.cpu_cores}")
        if self.cpu_time_s is not None and self.cpu_time_s < 1:
            raise ValueError(f"cpu_time_s must be >= 1 (RLIMIT_CPU counts whole seconds), got {self.cpu_time_s}")

    @property
    def effective_cpu_time_s(self) -> int:
        """The RLIMIT_CPU soft limit: ``cpu_time_s``, or the wall timeout rounded up plus one second."""
        if self.cpu_time_s is not None:
            return self.cpu_time_s
        return int(-(-self.timeout_s // 1)) + 1


@dataclass(frozen=True)
class SandboxRequest:
    """One program for :meth:`SandboxPool.run_many`: the arguments of :func:`run_program`."""

    source: str
    stdin: str = ""
    limits: SandboxLimits = SandboxLimits()


def run_program(
    source: str,
    *,
    stdin: str = "",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = DEFAULT_MEMORY_MB,
    output_limit_bytes: int = DEFAULT_OUTPUT_LIMIT_BYTES,
    max_processes: int = DEFAULT_MAX_PROCESSES,
    max_file_mb: int = DEFAULT_MAX_FILE_MB,
    cpu_time_s: int | None = None,
    cpu_cores: float = DEFAULT_CPU_CORES,
    python_executable: str | None = None,
) -> SandboxResult:
    """Run Python ``source`` in the sandbox; never raises for anything the program does.

    Args:
        source: the program, run as ``__main__`` by ``python -I -S`` (standard library only).
        stdin: the program's standard input.
        timeout_s: wall-clock limit in seconds, counted from the moment the program's interpreter is up.
        memory_mb: address-space limit (RLIMIT_AS) in MiB; virtual memory, so 32 is the floor.
        output_limit_bytes: bytes kept of stdout and of stderr each (default 1 MiB); the rest is dropped.
        max_processes: RLIMIT_NPROC, processes plus threads alive at once (default 64).
        max_file_mb: largest file it may write (RLIMIT_FSIZE, default 64 MiB). Also sizes its tmpfs working
            directory (``max_file_mb`` + the program + 1 MiB) and its private /dev/shm (``max_file_mb``);
            tmpfs is RAM and is not counted in ``memory_mb``.
        cpu_time_s: RLIMIT_CPU in whole seconds per process (default: ``timeout_s`` rounded up, plus one).
        cpu_cores: CPU quota of the whole run in cores (cgroup ``cpu.max``; only where per-run cgroups are
            available, see :mod:`~cipo_nemo.environments.sandbox_cgroup`).
        python_executable: interpreter for the program (default: the real path of ``sys.executable``). The
            program sees it, its standard library and the shared libraries it loads, read-only, and nothing
            else of the host (see :mod:`~cipo_nemo.environments.sandbox_runtime`).

    Raises:
        ValueError: invalid limits, or a source larger than ``max_file_mb`` (caller errors).
    """
    limits = SandboxLimits(
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        output_limit_bytes=output_limit_bytes,
        max_processes=max_processes,
        max_file_mb=max_file_mb,
        cpu_time_s=cpu_time_s,
        cpu_cores=cpu_cores,
    )
    return run_request(SandboxRequest(source=source, stdin=stdin, limits=limits), python_executable=python_executable)


def run_request(request: SandboxRequest, *, python_executable: str | None = None) -> SandboxResult:
    """:func:`run_program` for a :class:`SandboxRequest`."""
    python = os.path.realpath(python_executable or sys.executable)
    source_bytes = request.source.encode("utf-8", errors="surrogateescape")
    if len(source_bytes) > request.limits.max_file_mb << 20:
        raise ValueError(f"source is larger than max_file_mb={request.limits.max_file_mb}")
    started = time.monotonic()
    try:
        # A missing interpreter gets an empty view: its exec fails in the sandbox, reported as sandbox_error.
        view = runtime_view(python) if os.path.isfile(python) else RuntimeView((), (), ())
        with _UidLease() as uid, _run_cgroup(request.limits, len(source_bytes)) as cgroup:
            plan = _RunPlan(python=python, view=view, cgroup=cgroup)
            result = _run_sandboxed(source_bytes, request.stdin, request.limits, plan, uid, started)
            # Any OOM kill in the run's cgroup: on v1 (no oom.group) the killer may take a child and spare the program.
            if cgroup is not None and result.status != "sandbox_error" and oom_killed(cgroup):
                result = dataclasses.replace(result, status="memory")
            return result
    except OSError as exc:  # the trainer's side failed (fds, pids, uid slots, the interpreter probe): report
        return SandboxResult(status="sandbox_error", returncode=None, stdout="",
                             stderr=f"sandbox: could not start the sandbox: {exc}\n",
                             wall_s=time.monotonic() - started)


_T = TypeVar("_T")
_R = TypeVar("_R")


class SandboxPool:
    """Runs sandboxed programs on a bounded number of threads; each program is its own child process.

    At most ``max_workers`` programs from this pool run at once. Use it as a context manager or call
    :meth:`close`. ``python_executable`` applies to every program, as in :func:`run_program`.
    """

    def __init__(self, max_workers: int, *, python_executable: str | None = None) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.max_workers = max_workers
        self._python_executable = python_executable
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="cipo-sandbox")

    def submit(self, request: SandboxRequest) -> Future[SandboxResult]:
        """Start one program; the future's result is its :class:`SandboxResult`."""
        return self._executor.submit(run_request, request, python_executable=self._python_executable)

    def run_many(self, requests: Iterable[SandboxRequest]) -> list[SandboxResult]:
        """Run all ``requests``, at most ``max_workers`` at a time; results in request order."""
        futures = [self.submit(request) for request in requests]
        return [future.result() for future in futures]

    def map(self, function: Callable[[_T], _R], items: Iterable[_T]) -> list[_R]:
        """``[function(item) for item in items]`` on the pool's threads, results in item order: for callers
        that run several dependent programs per item (the code environment stops at a task's first failing
        test), so the bound on concurrent programs still holds."""
        return list(self._executor.map(function, items))

    def close(self) -> None:
        """Wait for running programs, then stop the threads."""
        self._executor.shutdown(wait=True)

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------------
# Parent side


@dataclass(frozen=True)
class _RunPlan:
    """Where a run's program comes from and what it sees: the interpreter, its runtime view, its cgroup."""

    python: str
    view: RuntimeView
    cgroup: RunCgroup | None


def _workdir_bytes(limits: SandboxLimits, source_bytes: int) -> int:
    return (limits.max_file_mb << 20) + source_bytes + _WORKDIR_SLACK_BYTES


@contextlib.contextmanager
def _run_cgroup(limits: SandboxLimits, source_bytes: int) -> Iterator[RunCgroup | None]:
    """The run's own cgroup(s), or None where cgroups are unavailable (rlimits only)."""
    base = sandbox_cgroup_base()
    if base is None:
        yield None
        return
    # Memory: one process's worth, the working directory and /dev/shm (tmpfs pages count), the launcher and init.
    memory = (limits.memory_mb << 20) + _workdir_bytes(limits, source_bytes) + (limits.max_file_mb << 20)
    cgroup_limits = CgroupLimits(memory_bytes=memory + _CGROUP_LAUNCHER_BYTES, pids=limits.max_processes + 2,
                                 cpu_cores=limits.cpu_cores)
    with run_cgroup(base, cgroup_limits) as cgroup:
        yield cgroup


class _UidLease:
    """Leases a dedicated sandbox uid for one run when running as root (``with`` gives None otherwise)."""

    def __init__(self) -> None:
        self._lock: socket.socket | None = None

    def __enter__(self) -> int | None:
        if os.geteuid() != 0:
            return None
        start = int.from_bytes(os.urandom(4), "little") % _SANDBOX_UID_SLOTS
        for offset in range(_SANDBOX_UID_SLOTS):
            uid = _SANDBOX_UID_BASE + (start + offset) % _SANDBOX_UID_SLOTS
            lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                lock.bind(f"\0cipo-sandbox-uid-{uid}")
            except OSError as exc:
                lock.close()
                if exc.errno == errno.EADDRINUSE:
                    continue
                raise
            self._lock = lock
            return uid
        raise OSError(errno.EAGAIN, "every sandbox uid slot is in use")

    def __exit__(self, *exc_info: object) -> None:
        if self._lock is not None:
            self._lock.close()


def _sealed_memfd(data: bytes, name: str) -> int:
    """An in-memory file holding ``data``, sealed so that nobody (the program included) can change it."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
        seals = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except BaseException:
        os.close(fd)
        raise
    return fd


class _CappedStream:
    """Keeps the first ``limit`` bytes of a pipe; discards the rest in the kernel (splice to /dev/null)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kept = bytearray()
        self.dropped = 0

    def pump(self, fd: int, devnull: int) -> bool:
        """Move what is available; False at end of file."""
        try:
            if len(self.kept) < self.limit:
                data = os.read(fd, _READ_CHUNK)
                room = self.limit - len(self.kept)
                self.kept += data[:room]
                self.dropped += max(0, len(data) - room)
                return bool(data)
            moved = os.splice(fd, devnull, _READ_CHUNK, flags=os.SPLICE_F_NONBLOCK)
        except BlockingIOError:
            return True
        self.dropped += moved
        return moved > 0

    def text(self) -> str:
        decoded = self.kept.decode("utf-8", errors="replace")
        if self.dropped:
            decoded += TRUNCATION_MARKER.format(dropped=self.dropped)
        return decoded


@dataclass
class _RunRecord:
    """What the parent learned while the sandbox ran (from the status pipe and its own clock)."""

    started: bool = False
    timed_out: bool = False
    setup_error: str | None = None
    wait_status: int | None = None
    cpu_s: float = 0.0


@functools.cache
def _launcher_code() -> bytes:
    """The launcher module compiled once, marshalled for the launcher's bootstrap."""
    path = sandbox_launcher.__file__
    with open(path, encoding="utf-8") as file:
        code = compile(file.read(), path, "exec", dont_inherit=True)
    return marshal.dumps(code)


# The launcher runs the same interpreter binary as this process, so the marshalled code object loads as is.
_LAUNCHER_BOOTSTRAP = """\
import marshal, os, sys
with os.fdopen(int(sys.argv[1]), "rb") as file:
    code = marshal.loads(file.read())
namespace = {"__name__": "_cipo_sandbox_launcher"}
exec(code, namespace)
namespace["launcher_main"](sys.argv[2:])
"""


def _launcher_argv(fds: dict[str, int], source_bytes: int, limits: SandboxLimits, plan: _RunPlan,
                   uid: int | None) -> list[str]:
    options = {
        "parent_pid": os.getpid(),
        **fds,
        "uid": -1 if uid is None else uid,
        "python": plan.python,
        "memory_bytes": limits.memory_mb << 20,
        "cpu_s": limits.effective_cpu_time_s,
        "nproc": limits.max_processes,
        "fsize_bytes": limits.max_file_mb << 20,
        "workdir_bytes": _workdir_bytes(limits, source_bytes),
    }
    arguments = [f"{key}={value}" for key, value in options.items()]
    arguments += [f"cgroup_procs={path}" for path in ([] if plan.cgroup is None else plan.cgroup.procs_files)]
    arguments += [f"bind_dir={path}" for path in plan.view.directories]
    arguments += [f"bind_file={path}" for path in plan.view.files]
    arguments += [f"link={path}{LINK_SEPARATOR}{target}" for path, target in plan.view.links]
    arguments += [f"cover={path}" for path in plan.view.covered]
    return [sys.executable, "-I", "-S", "-c", _LAUNCHER_BOOTSTRAP, str(fds["code_fd"]), *arguments]


def _run_sandboxed(source: bytes, stdin: str, limits: SandboxLimits, plan: _RunPlan,
                   uid: int | None, started: float) -> SandboxResult:
    with contextlib.ExitStack() as cleanup:
        program_fd = _sealed_memfd(source, "cipo-program")
        cleanup.callback(os.close, program_fd)
        stdin_fd = _sealed_memfd(stdin.encode("utf-8", errors="surrogateescape"), "cipo-stdin")
        cleanup.callback(os.close, stdin_fd)
        status_read, status_write = os.pipe()
        cleanup.callback(os.close, status_write)
        # Closing control_write is the stop request: the launcher then kills the namespace init and exits
        # once the whole namespace is gone. It also fires if this process dies.
        control_read, control_write = os.pipe()
        cleanup.callback(os.close, control_read)
        code_fd = _sealed_memfd(_launcher_code(), "cipo-launcher")
        cleanup.callback(os.close, code_fd)
        fds = {"status_fd": status_write, "program_fd": program_fd, "control_fd": control_read, "code_fd": code_fd}
        try:
            launcher = subprocess.Popen(
                _launcher_argv(fds, len(source), limits, plan, uid), stdin=stdin_fd, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, env=_LAUNCHER_ENV, cwd="/", pass_fds=tuple(fds.values()),
                start_new_session=True,
            )
        except BaseException:
            os.close(status_read)
            os.close(control_write)
            raise
    # From here on only the launcher holds the write end of the status pipe and the memfds.
    stdout, stderr = _CappedStream(limits.output_limit_bytes), _CappedStream(limits.output_limit_bytes)
    try:
        record = _collect(launcher, status_read, stdout, stderr, limits.timeout_s, started)
    finally:
        _end_sandbox(launcher, control_write)
        os.close(status_read)
    stderr_text = stderr.text()
    status, returncode = _classify(record, limits.effective_cpu_time_s, stderr_text[-_STDERR_TAIL_FOR_MEMORY:])
    if status == "sandbox_error":
        reason = record.setup_error or "the program's interpreter did not start"
        stderr_text = f"sandbox: {reason}\n{stderr_text}"
    return SandboxResult(status=status, returncode=returncode, stdout=stdout.text(), stderr=stderr_text,
                         wall_s=time.monotonic() - started)


def _collect(launcher: subprocess.Popen[bytes], status_fd: int, stdout: _CappedStream, stderr: _CappedStream,
             timeout_s: float, started: float) -> _RunRecord:
    """Pump the three pipes until all reach end of file (the whole sandbox is gone) or a deadline passes."""
    assert launcher.stdout is not None and launcher.stderr is not None
    record = _RunRecord()
    status_buffer = bytearray()
    streams = {launcher.stdout.fileno(): stdout, launcher.stderr.fileno(): stderr}
    deadline = started + _SETUP_TIMEOUT_S
    with open(os.devnull, "wb") as devnull, selectors.DefaultSelector() as selector:
        for fd in (*streams, status_fd):
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ)
        for fd in streams:
            with contextlib.suppress(OSError):  # a smaller pipe only means more reads
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                record.timed_out = record.started
                if not record.started:
                    record.setup_error = f"the sandbox did not start within {_SETUP_TIMEOUT_S:.0f} s"
                break
            for key, _ in selector.select(remaining):
                if key.fd == status_fd:
                    still_open = _read_status(status_fd, status_buffer)
                    was_started = record.started
                    _parse_status(status_buffer, record)
                    if record.started and not was_started:
                        deadline = time.monotonic() + timeout_s
                else:
                    still_open = streams[key.fd].pump(key.fd, devnull.fileno())
                if not still_open:
                    selector.unregister(key.fd)
    return record


def _read_status(fd: int, buffer: bytearray) -> bool:
    try:
        data = os.read(fd, 4096)
    except BlockingIOError:
        return True
    if len(buffer) < _STATUS_LIMIT_BYTES:
        buffer += data
    return bool(data)


def _parse_status(buffer: bytearray, record: _RunRecord) -> None:
    """Consume complete lines: ``S`` (program started), ``E msg`` (set-up failed), ``W status cpu`` (exited)."""
    while b"\n" in buffer:
        line, _, rest = bytes(buffer).partition(b"\n")
        buffer[:] = rest
        kind, _, payload = line.decode("utf-8", errors="replace").partition(" ")
        if kind == "S":
            record.started = True
        elif kind == "E" and record.setup_error is None:
            record.setup_error = payload
        elif kind == "W":
            wait_status, _, cpu = payload.partition(" ")
            record.wait_status, record.cpu_s = int(wait_status), float(cpu)


def _end_sandbox(launcher: subprocess.Popen[bytes], control_fd: int) -> None:
    """Stop the sandbox and return only once every process of it is gone.

    Closing the control pipe makes the launcher SIGKILL the namespace init; the launcher exits after reaping
    the init, and the init's exit completes only after the kernel killed and reaped the rest of the namespace.
    If the launcher does not exit in time, its process group (launcher and init) gets SIGKILL instead.
    """
    os.close(control_fd)
    try:
        launcher.wait(timeout=_KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            # Safe from pid reuse: the launcher is not reaped yet, so its process group id is still ours.
            os.killpg(launcher.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            # Only a process stuck in the kernel survives SIGKILL this long; the trainer must not block on it.
            launcher.wait(timeout=_KILL_GRACE_S)
    for stream in (launcher.stdout, launcher.stderr):
        if stream is not None:
            stream.close()


def _classify(record: _RunRecord, cpu_limit_s: int, stderr_tail: str) -> tuple[str, int | None]:
    """(status, returncode) from what the run reported; see the module docstring for the mapping."""
    if record.setup_error is not None or not record.started:
        return "sandbox_error", None
    if record.timed_out:
        return "timeout", None
    if record.wait_status is None:
        return "killed", None  # torn down from outside before it could report (e.g. by the OOM killer)
    if os.WIFEXITED(record.wait_status):
        code = os.WEXITSTATUS(record.wait_status)
        if code == 0:
            return "ok", 0
        if code == MEMORY_ERROR_EXIT_CODE or "MemoryError" in stderr_tail:
            return "memory", code
        return "error", code
    signal_number = os.WTERMSIG(record.wait_status)
    if signal_number == signal.SIGXCPU or (signal_number == signal.SIGKILL and record.cpu_s >= cpu_limit_s):
        return "timeout", -signal_number
    return "killed", -signal_number
