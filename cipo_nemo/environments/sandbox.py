"""Run an untrusted Python program in an isolated, resource-limited child process.

Entry points: :func:`run_program` (one program) and :class:`SandboxPool` (many, with bounded concurrency).
Everything that executes model-written code in this project goes through here. Linux only. See
``docs/sandbox.md`` for the guarantees, the non-guarantees and measured costs.

Process tree of one run (the parent is a trainer thread)::

    trainer --Popen--> launcher L (trainer's uid, own session; runs this file's launcher section, python -I -S)
                        | unshare: mount, network, PID, IPC, UTS namespaces (+ a user namespace when not root)
                        +--fork--> init I (PID 1 of the new PID namespace): builds the file system view
                                    +--fork--> program P: rlimits, sandbox uid, no_new_privs, then
                                               exec ``python -I -S -c WRAPPER`` which runs the source

Isolation:

- **PID namespace**: every process the program starts lives in it. When I exits (right after P exits) or is
  killed, the kernel kills every process left in the namespace, so a double-forked daemon cannot outlive the
  run. The parent ends every run with SIGKILL to L's process group (L and I; the program cannot join it), and
  L and I carry a parent-death SIGKILL, so the namespace also dies with the trainer thread or process.
- **Network namespace** with only a loopback device, which is down: no address, loopback included, is
  reachable. **IPC and UTS namespaces**: no System V IPC objects or hostname shared with the host.
- **Mount namespace**: every inherited mount is made read-only and nosuid (recursively, ``mount_setattr``,
  Linux >= 5.12); ``/proc`` is a fresh procfs of the run's PID namespace (host processes are invisible);
  ``/tmp`` is an empty read-only tmpfs holding the working directory ``/tmp/work`` (tmpfs, mode 0700, owned
  by the sandbox uid, ``max_file_mb`` + the program + 1 MiB in size); ``/dev/shm`` is a private tmpfs of
  ``max_file_mb``; ``hidden_paths`` (default ``/root``, ``/home``, ``/run`` and ``$HOME``) are covered by
  empty read-only tmpfs mounts, except the interpreter's prefix, which is bind-mounted back read-only at its
  own path. All of it disappears with the namespace: nothing is written to the host's disks.
- **Credentials**: as root, P drops to a dedicated uid/gid (``_SANDBOX_UID_BASE`` + a slot leased for the
  run, no supplementary groups) and sets ``no_new_privs``. A dedicated uid per concurrent run makes
  RLIMIT_NPROC (counted per uid, and never enforced for root) a per-run process limit. Not root: a user
  namespace maps the caller's uid to uid 1000 inside it and P's exec drops every capability.
- **OOM preference**: every sandbox process has ``oom_score_adj`` 1000, so when memory runs out the kernel
  kills sandbox processes before the trainer.
- **rlimits** on P: RLIMIT_AS (``memory_mb``), RLIMIT_CPU (``cpu_time_s``; SIGKILL one second later),
  RLIMIT_NPROC (``max_processes``), RLIMIT_FSIZE (``max_file_mb``), RLIMIT_CORE 0, RLIMIT_NOFILE 1024.
- **Wall clock**: the parent kills the run ``timeout_s`` after the program's interpreter is up (sandbox
  start-up is not charged to the program; start-up has its own ``_SETUP_TIMEOUT_S``).
- **Output**: read into bounded buffers (the rest is spliced to /dev/null), so a program printing gigabytes
  costs the parent at most ``output_limit_bytes`` of memory per stream.
- **Environment**: only ``PATH``, ``LANG``, ``LC_ALL``, ``HOME`` and ``TMPDIR`` (the last two: the working
  directory). Nothing of the trainer's environment passes.

If any isolation step fails, the program is not run and the result is ``sandbox_error``: the sandbox fails
closed and never falls back to running unsandboxed.

The program runs on the trainer's own interpreter binary (its real path, not the venv) in isolated mode without
the site module, ``python -I -S``: standard library only, no third-party packages.

Outcome mapping (``SandboxResult.status``): exit 0 -> ``ok``; other exit -> ``error``; killed at the wall
deadline or by RLIMIT_CPU -> ``timeout``; ``MemoryError`` (the wrapper exits with
``MEMORY_ERROR_EXIT_CODE``, or a nonzero exit whose stderr ends mentioning ``MemoryError``) -> ``memory``; any
other signal -> ``killed``; failure to set up, including an interpreter that cannot start -> ``sandbox_error``.

Layout of this file: the public API and the parent side first; the code that runs in the sandbox's own
processes is the self-contained *launcher section* at the end. The parent compiles only that section, once,
and hands the code object to each launcher (see :func:`_launcher_code`), so that a run pays for the
interpreter and ``ctypes`` (~14 ms of start-up) instead of importing this module (~55 ms).
"""

from __future__ import annotations

import __future__
import contextlib
import errno
import fcntl
import functools
import marshal
import os
import selectors
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

STATUSES = ("ok", "error", "timeout", "memory", "killed", "sandbox_error")

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_MB = 1024
DEFAULT_OUTPUT_LIMIT_BYTES = 1 << 20
DEFAULT_MAX_PROCESSES = 64
DEFAULT_MAX_FILE_MB = 64
DEFAULT_HIDDEN_PATHS = ("/root", "/home", "/run")
TRUNCATION_MARKER = "\n[cipo sandbox: output truncated, {dropped} more bytes dropped]\n"
# MEMORY_ERROR_EXIT_CODE and SANDBOX_WORKDIR are defined in the launcher section below.

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
_LAUNCHER_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
_LAUNCHER_SECTION_MARKER = "# === launcher section ==="


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
    hidden_paths: Sequence[str] | None = None,
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
        hidden_paths: directories replaced by empty read-only mounts (default :data:`DEFAULT_HIDDEN_PATHS`,
            that is ``/root``, ``/home`` and ``/run`` (service sockets), plus ``$HOME``); the interpreter's
            prefix stays visible even when it lies under one of them.
        python_executable: interpreter for the program (default: the real path of ``sys.executable``). Its
            prefix, the directory above its ``bin/``, must be world-readable.

    Raises:
        ValueError: invalid limits or hidden paths, or a source larger than ``max_file_mb`` (caller errors).
    """
    limits = SandboxLimits(
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        output_limit_bytes=output_limit_bytes,
        max_processes=max_processes,
        max_file_mb=max_file_mb,
        cpu_time_s=cpu_time_s,
    )
    return run_request(
        SandboxRequest(source=source, stdin=stdin, limits=limits),
        hidden_paths=hidden_paths,
        python_executable=python_executable,
    )


def run_request(
    request: SandboxRequest,
    *,
    hidden_paths: Sequence[str] | None = None,
    python_executable: str | None = None,
) -> SandboxResult:
    """:func:`run_program` for a :class:`SandboxRequest`."""
    python = os.path.realpath(python_executable or sys.executable)
    plan = _filesystem_plan(python, _hidden_path_list(hidden_paths))
    source_bytes = request.source.encode("utf-8", errors="surrogateescape")
    if len(source_bytes) > request.limits.max_file_mb << 20:
        raise ValueError(f"source is larger than max_file_mb={request.limits.max_file_mb}")
    started = time.monotonic()
    try:
        with _UidLease() as uid:
            return _run_sandboxed(source_bytes, request.stdin, request.limits, plan, uid, started)
    except OSError as exc:  # the trainer's side ran out of something (fds, pids, uid slots): report, do not raise
        return SandboxResult(status="sandbox_error", returncode=None, stdout="",
                             stderr=f"sandbox: could not start the sandbox: {exc}\n",
                             wall_s=time.monotonic() - started)


_T = TypeVar("_T")
_R = TypeVar("_R")


class SandboxPool:
    """Runs sandboxed programs on a bounded number of threads; each program is its own child process.

    At most ``max_workers`` programs from this pool run at once. Use it as a context manager or call
    :meth:`close`. ``hidden_paths`` and ``python_executable`` apply to every program, as in :func:`run_program`.
    """

    def __init__(self, max_workers: int, *, hidden_paths: Sequence[str] | None = None,
                 python_executable: str | None = None) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.max_workers = max_workers
        self._hidden_paths = hidden_paths
        self._python_executable = python_executable
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="cipo-sandbox")

    def submit(self, request: SandboxRequest) -> Future[SandboxResult]:
        """Start one program; the future's result is its :class:`SandboxResult`."""
        return self._executor.submit(
            run_request, request, hidden_paths=self._hidden_paths, python_executable=self._python_executable
        )

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
class _FilesystemPlan:
    """What the namespace init mounts: ``hidden`` directories get covered, ``exposed`` paths bound back."""

    python: str
    hidden: tuple[str, ...]
    exposed: tuple[str, ...]


def _hidden_path_list(hidden_paths: Sequence[str] | None) -> tuple[str, ...]:
    if hidden_paths is None:
        home = os.environ.get("HOME", "")
        with_home = os.path.isabs(home) and os.path.realpath(home) != "/"
        return DEFAULT_HIDDEN_PATHS + ((home,) if with_home else ())
    for path in hidden_paths:
        if not os.path.isabs(path):
            raise ValueError(f"hidden paths must be absolute, got {path!r}")
        if os.path.realpath(path) == "/":
            raise ValueError("cannot hide '/'")
    return tuple(hidden_paths)


def _first_untraversable_ancestor(path: str) -> str | None:
    """The highest directory on ``path`` that users other than its owner cannot enter (no o+x), if any."""
    current = "/"
    for part in path.strip("/").split("/"):
        current = os.path.join(current, part)
        if not os.stat(current).st_mode & stat.S_IXOTH:
            return current
    return None


def _filesystem_plan(python: str, hidden_paths: tuple[str, ...]) -> _FilesystemPlan:
    """Directories to cover, and the interpreter prefix to bind back when it lies under one of them."""
    if not os.path.isfile(python):
        return _FilesystemPlan(python=python, hidden=(), exposed=())  # exec fails: the run reports sandbox_error
    prefix = os.path.dirname(os.path.dirname(python))
    candidates = {os.path.realpath(path) for path in hidden_paths if os.path.isdir(path)}
    if os.geteuid() == 0:
        # The sandbox uid reaches the interpreter only if every directory above it can be entered by "others".
        blocked = _first_untraversable_ancestor(prefix)
        if blocked is not None:
            candidates.add(blocked)
    outermost = sorted(
        path for path in candidates if not any(other != path and _is_under(path, other) for other in candidates)
    )
    exposed = (prefix,) if any(_is_under(prefix, hidden) for hidden in outermost) else ()
    return _FilesystemPlan(python=python, hidden=tuple(outermost), exposed=exposed)


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
    """The launcher section of this file compiled once, marshalled for the launcher's bootstrap.

    Padded with blank lines so that tracebacks from the launcher keep this file's line numbers.
    """
    with open(__file__, encoding="utf-8") as file:
        lines = file.readlines()
    first = lines.index(_LAUNCHER_SECTION_MARKER + "\n")
    source = "\n" * first + "".join(lines[first:])
    code = compile(source, __file__, "exec", flags=__future__.annotations.compiler_flag, dont_inherit=True)
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


def _launcher_argv(fds: dict[str, int], source_bytes: int, limits: SandboxLimits, plan: _FilesystemPlan,
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
        "workdir_bytes": (limits.max_file_mb << 20) + source_bytes + _WORKDIR_SLACK_BYTES,
    }
    arguments = [f"{key}={value}" for key, value in options.items()]
    arguments += [f"hide={path}" for path in plan.hidden] + [f"expose={path}" for path in plan.exposed]
    return [sys.executable, "-I", "-S", "-c", _LAUNCHER_BOOTSTRAP, str(fds["code_fd"]), *arguments]


def _run_sandboxed(source: bytes, stdin: str, limits: SandboxLimits, plan: _FilesystemPlan,
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


# === launcher section ===
# Everything below also runs in the sandbox's launcher, init and program processes, compiled on its own by
# _launcher_code: it may use only what it defines or imports itself, and must never print to stdout.

import ctypes  # noqa: E402  (the launcher section's own imports; see the module docstring)
import os  # noqa: E402,F811
import resource  # noqa: E402
import select  # noqa: E402

MEMORY_ERROR_EXIT_CODE = 97
SANDBOX_WORKDIR = "/tmp/work"
_USERNS_UID = 1000
_SETUP_FAILED_EXIT = 125
_NOFILE_LIMIT = 1024
_AUXILIARY_TMPFS_BYTES = 1 << 20
_OOM_SCORE_ADJ = 1000  # the maximum: first in line for the OOM killer
_SIGKILL = 9  # the signal module costs the launcher ~4 ms of start-up (it imports enum)
_PROGRAM_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "HOME": SANDBOX_WORKDIR,
    "TMPDIR": SANDBOX_WORKDIR,
}
# Linux ABI constants that Python 3.11's os module does not expose.
_CLONE_NEWNS = 0x00020000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY = 0x1
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000
_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38
_SYS_MOUNT_SETATTR = 442  # one number on every architecture (syscalls added since 5.1 share a table)
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2

# Runs inside the sandbox as ``python -I -S -c _WRAPPER_SOURCE STATUS_FD PROGRAM_FD``: reads the program from its
# sealed memfd, reports "started" on the status pipe, closes both descriptors (the program never sees them),
# then runs the program as __main__ with a clean namespace, turns MemoryError into MEMORY_ERROR_EXIT_CODE and
# leaves its own frame out of tracebacks.
_WRAPPER_SOURCE = f"""
def _cipo_run():
    import os, sys
    status_fd, program_fd = int(sys.argv[1]), int(sys.argv[2])
    chunks = []
    while chunk := os.read(program_fd, 1 << 20):
        chunks.append(chunk)
    os.close(program_fd)
    source = b"".join(chunks)
    path = os.path.join(os.getcwd(), "main.py")
    with open(path, "wb") as file:  # on disk only so that tracebacks can show source lines
        file.write(source)
    os.write(status_fd, b"S\\n")
    os.close(status_fd)
    namespace = sys.modules["__main__"].__dict__
    for name in [name for name in namespace if not name.startswith("__")]:
        del namespace[name]
    namespace["__file__"] = path
    sys.argv[:] = [path]
    try:
        exec(compile(source, path, "exec"), namespace)
    except SystemExit:
        raise
    except MemoryError:
        try:
            sys.stdout.flush()
        finally:
            os.write(2, b"MemoryError: the sandbox memory limit was reached\\n")
            os._exit({MEMORY_ERROR_EXIT_CODE})
    except BaseException as error:
        import traceback
        # Print the traceback as Python would, minus this wrapper's frame, then exit 1 the normal way.
        traceback.print_exception(type(error), error, error.__traceback__.tb_next)
        sys.exit(1)
_cipo_run()
"""


class _LaunchOptions:
    """The launcher's command line (``key=value`` words; ``hide=`` and ``expose=`` may repeat)."""

    def __init__(self, arguments: list[str]) -> None:
        values: dict[str, str] = {}
        hidden: list[str] = []
        exposed: list[str] = []
        for argument in arguments:
            key, _, value = argument.partition("=")
            if key == "hide":
                hidden.append(value)
            elif key == "expose":
                exposed.append(value)
            else:
                values[key] = value
        self.parent_pid = int(values["parent_pid"])
        self.status_fd = int(values["status_fd"])
        self.program_fd = int(values["program_fd"])
        self.control_fd = int(values["control_fd"])
        self.uid = int(values["uid"])
        self.python = values["python"]
        self.memory_bytes = int(values["memory_bytes"])
        self.cpu_s = int(values["cpu_s"])
        self.nproc = int(values["nproc"])
        self.fsize_bytes = int(values["fsize_bytes"])
        self.workdir_bytes = int(values["workdir_bytes"])
        self.hidden = tuple(hidden)
        self.exposed = tuple(exposed)


def _is_under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


class _Libc:
    """The few libc calls the launcher needs; each raises OSError on failure."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                                     ctypes.c_char_p]
        self._libc.syscall.restype = ctypes.c_long

    @staticmethod
    def _check(result: int, what: str) -> None:
        if result != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"{what}: {os.strerror(error)}")

    def unshare(self, flags: int) -> None:
        self._check(self._libc.unshare(flags), "unshare")

    def try_unshare(self, flags: int) -> bool:
        return self._libc.unshare(flags) == 0

    def prctl(self, option: int, value: int, what: str) -> None:
        self._check(self._libc.prctl(option, value, 0, 0, 0), what)

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int,
              data: str | None = None) -> None:
        def encode(text: str | None) -> bytes | None:
            return None if text is None else text.encode()

        result = self._libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data))
        self._check(result, f"mount {fstype or source} on {target}")

    def set_readonly(self, path: str, *, recursive: bool) -> None:
        """Make the mount at ``path`` (and, if ``recursive``, every mount below it) read-only and nosuid."""
        attributes = (ctypes.c_uint64 * 4)(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0, 0, 0)
        flags = _AT_RECURSIVE if recursive else 0
        result = self._libc.syscall(_SYS_MOUNT_SETATTR, _AT_FDCWD, path.encode(), flags, attributes,
                                    ctypes.sizeof(attributes))
        self._check(result, f"mount_setattr({path}, read-only) [needs Linux >= 5.12]")

    def tmpfs(self, target: str, *, size: int, mode: str, owner: int) -> None:
        options = f"size={size},nr_inodes={max(64, size // 4096)},mode={mode},uid={owner},gid={owner}"
        self.mount("tmpfs", target, "tmpfs", _MS_NOSUID | _MS_NODEV, options)


def _report(fd: int, kind: str, text: str = "") -> None:
    line = f"{kind} {text}".replace("\n", " ").strip() + "\n"
    os.write(fd, line.encode("utf-8", errors="replace")[:4000])


def launcher_main(arguments: list[str]) -> None:
    """Launcher L: enter fresh namespaces, fork the namespace init, wait for it. Never returns.

    While the init runs, L also watches the control pipe: when the parent closes it (stop request, or the
    parent died), L SIGKILLs the init. L exits only after reaping the init, that is after the whole PID
    namespace is gone, so the parent's wait on L is a wait on every process of the run.
    """
    options = _LaunchOptions(arguments)
    try:
        libc = _Libc()
        libc.prctl(_PR_SET_PDEATHSIG, _SIGKILL, "prctl(PR_SET_PDEATHSIG)")
        if os.getppid() != options.parent_pid:
            os._exit(_SETUP_FAILED_EXIT)  # the trainer thread is already gone
        # Inherited by init and program: under memory pressure the kernel kills sandbox processes first, even
        # when their memory is not theirs by RSS (tmpfs, memfds), instead of the trainer.
        with open("/proc/self/oom_score_adj", "w") as file:
            file.write(str(_OOM_SCORE_ADJ))
        in_user_namespace = _enter_namespaces(libc, options)
        init_pid = os.fork()
    except OSError as exc:
        _report(options.status_fd, "E", f"launcher: {exc}")
        os._exit(_SETUP_FAILED_EXIT)
    if init_pid == 0:
        os.close(options.control_fd)
        _namespace_init(libc, options, in_user_namespace)
    init_exited = os.pidfd_open(init_pid)  # safe: the init is our unreaped child
    ready, _, _ = select.select([init_exited, options.control_fd], [], [])
    if init_exited not in ready:
        os.kill(init_pid, _SIGKILL)
    os.waitpid(init_pid, 0)
    os._exit(0)


def _enter_namespaces(libc: _Libc, options: _LaunchOptions) -> bool:
    """Unshare every namespace. Returns True when a user namespace was needed: not root, or root without
    CAP_SYS_ADMIN, in which case the launcher first becomes the leased sandbox uid so that the program's
    files and processes are never the host's uid 0."""
    flags = _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWIPC | _CLONE_NEWUTS
    if os.geteuid() == 0:
        if libc.try_unshare(flags):
            return False
        os.setgroups([])
        os.setresgid(options.uid, options.uid, options.uid)
        os.setresuid(options.uid, options.uid, options.uid)
        # The uid change cleared both: /proc/self/uid_map needs a dumpable process.
        libc.prctl(_PR_SET_DUMPABLE, 1, "prctl(PR_SET_DUMPABLE)")
        libc.prctl(_PR_SET_PDEATHSIG, _SIGKILL, "prctl(PR_SET_PDEATHSIG)")
        if os.getppid() != options.parent_pid:
            os._exit(_SETUP_FAILED_EXIT)
    outer_uid, outer_gid = os.geteuid(), os.getegid()
    libc.unshare(flags | _CLONE_NEWUSER)
    for name, text in (("setgroups", "deny"), ("uid_map", f"{_USERNS_UID} {outer_uid} 1"),
                       ("gid_map", f"{_USERNS_UID} {outer_gid} 1")):
        with open(f"/proc/self/{name}", "w") as file:
            file.write(text)
    return True


def _namespace_init(libc: _Libc, options: _LaunchOptions, in_user_namespace: bool) -> None:
    """Init I, PID 1 of the run's namespace: build the file system view, fork the program, reap until the
    program exits, report its status. Its exit ends the PID namespace, killing whatever the program left."""
    try:
        libc.prctl(_PR_SET_PDEATHSIG, _SIGKILL, "prctl(PR_SET_PDEATHSIG)")
        if in_user_namespace:
            _build_filesystem(libc, options, system_owner=_USERNS_UID, sandbox_owner=_USERNS_UID)
        else:
            _build_filesystem(libc, options, system_owner=0, sandbox_owner=options.uid)
        program_pid = os.fork()
    except OSError as exc:
        _report(options.status_fd, "E", f"namespace init: {exc}")
        os._exit(_SETUP_FAILED_EXIT)
    if program_pid == 0:
        _exec_program(libc, options, in_user_namespace)
    while True:
        pid, wait_status, usage = os.wait4(-1, 0)
        if pid == program_pid:
            _report(options.status_fd, "W", f"{wait_status} {usage.ru_utime + usage.ru_stime:.3f}")
            os._exit(0)


def _build_filesystem(libc: _Libc, options: _LaunchOptions, *, system_owner: int, sandbox_owner: int) -> None:
    """Everything read-only; a fresh /proc; hidden paths covered; a private /tmp/work and /dev/shm.

    ``system_owner`` owns the read-only covers (root, or the mapped uid in a user namespace, where uid 0 is
    unmapped); ``sandbox_owner`` owns the writable directories.
    """
    libc.mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing we mount propagates back to the host
    exposed_fds = [_open_exposed(path) for path in options.exposed]  # before covering them
    libc.set_readonly("/", recursive=True)
    _mount_fresh_proc(libc)
    for hidden in options.hidden:
        libc.tmpfs(hidden, size=_AUXILIARY_TMPFS_BYTES, mode="0755", owner=system_owner)
        for path, fd in zip(options.exposed, exposed_fds):
            if _is_under(path, hidden):
                os.makedirs(path, mode=0o755, exist_ok=True)
                libc.mount(f"/proc/self/fd/{fd}", path, None, _MS_BIND | _MS_REC)
                libc.set_readonly(path, recursive=True)
        libc.set_readonly(hidden, recursive=False)
    for fd in exposed_fds:
        os.close(fd)
    libc.tmpfs("/tmp", size=_AUXILIARY_TMPFS_BYTES, mode="0755", owner=system_owner)
    os.mkdir(SANDBOX_WORKDIR, 0o700)
    libc.tmpfs(SANDBOX_WORKDIR, size=options.workdir_bytes, mode="0700", owner=sandbox_owner)
    libc.set_readonly("/tmp", recursive=False)
    if os.path.isdir("/dev/shm"):
        libc.tmpfs("/dev/shm", size=options.fsize_bytes, mode="0700", owner=sandbox_owner)


def _open_exposed(path: str) -> int:
    try:
        return os.open(path, os.O_PATH | os.O_DIRECTORY)
    except PermissionError as exc:
        # Root without CAP_SYS_ADMIN: the launcher already is the sandbox uid and cannot reach the interpreter.
        raise PermissionError(exc.errno, f"the sandbox uid cannot reach the interpreter prefix {path}; "
                                         "pass a world-readable python_executable (e.g. /usr/bin/python3)") from exc


def _mount_fresh_proc(libc: _Libc) -> None:
    """procfs of this PID namespace. In a user namespace the kernel may refuse (containers mask parts of
    /proc); then an empty tmpfs covers /proc instead, which still hides the host's processes."""
    try:
        libc.mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    except PermissionError:
        libc.mount("tmpfs", "/proc", "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC | _MS_RDONLY, "size=4096")


def _exec_program(libc: _Libc, options: _LaunchOptions, in_user_namespace: bool) -> None:
    """Program P: limits, credentials, then exec the wrapper. Never returns."""
    # In a user namespace the launcher and the init run under the program's uid there and count against it.
    nproc = options.nproc + 2 if in_user_namespace else options.nproc
    try:
        for which, soft, hard in (
            (resource.RLIMIT_CORE, 0, 0),
            (resource.RLIMIT_CPU, options.cpu_s, options.cpu_s + 1),
            (resource.RLIMIT_AS, options.memory_bytes, options.memory_bytes),
            (resource.RLIMIT_NPROC, nproc, nproc),
            (resource.RLIMIT_FSIZE, options.fsize_bytes, options.fsize_bytes),
            (resource.RLIMIT_NOFILE, _NOFILE_LIMIT, _NOFILE_LIMIT),
        ):
            resource.setrlimit(which, (soft, hard))
        if not in_user_namespace:
            os.setgroups([])
            os.setresgid(options.uid, options.uid, options.uid)
            os.setresuid(options.uid, options.uid, options.uid)
        libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, "prctl(PR_SET_NO_NEW_PRIVS)")
        libc.prctl(_PR_SET_PDEATHSIG, _SIGKILL, "prctl(PR_SET_PDEATHSIG)")  # after the uid change, which clears it
        os.chdir(SANDBOX_WORKDIR)
        argv = [options.python, "-I", "-S", "-c", _WRAPPER_SOURCE, str(options.status_fd), str(options.program_fd)]
        os.execve(options.python, argv, _PROGRAM_ENV)
    except OSError as exc:
        _report(options.status_fd, "E", f"cannot start the program: {exc}")
        os._exit(_SETUP_FAILED_EXIT)
