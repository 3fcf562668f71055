"""The sandbox's own processes: launcher, namespace init and program (see :mod:`cipo_nemo.environments.sandbox`).

This module runs in the processes of a sandboxed run, never in the trainer: the parent
(:mod:`~cipo_nemo.environments.sandbox`) starts ``python -I -S`` with a small bootstrap that executes this
module's code object, compiled once by the parent and handed over in a sealed memfd, and calls
:func:`launcher_main` with the ``key=value`` words of :class:`_LaunchOptions`. So that a run pays for the
interpreter and ``ctypes`` only (~14 ms of start-up, not the ~55 ms of importing the package), it imports only
the standard library and nothing of ``cipo_nemo``; it must never print to stdout (the program's stdout is the
launcher's). It can also run as its own file, ``python -I -S sandbox_launcher.py key=value ...``.

Process tree of one run (the parent is a trainer thread)::

    trainer --Popen--> launcher L (trainer's uid, own session; runs ``sandbox_launcher``, python -I -S)
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
- **Mount namespace** whose root is a fresh tmpfs holding an allow list, entered with ``pivot_root``; the
  host's tree is then detached. The program sees: the interpreter's runtime (the ``bind_file``/``bind_dir``
  paths found by :mod:`~cipo_nemo.environments.sandbox_runtime`), bind-mounted read-only and nosuid at their
  host paths, its site-packages covered, plus the ``link`` symlinks to the dynamic loader; ``/tmp``, an empty
  read-only tmpfs holding the working directory ``/tmp/work`` (tmpfs, mode 0700, owned by the sandbox uid,
  ``max_file_mb`` + the program + 1 MiB in size); a private ``/dev/shm`` of ``max_file_mb``; a fresh
  ``/proc`` of the run's PID namespace (host processes are invisible); ``/dev/null``, ``/dev/zero``,
  ``/dev/urandom`` and the ``/dev/fd``, ``/dev/std*`` links. Nothing else of the host exists for it, and all
  of it disappears with the namespace: nothing is written to the host's disks.
- **cgroup**: when the parent made one for the run (``cgroup_procs``), the launcher joins it first, so every
  process of the run is born in it (see :mod:`~cipo_nemo.environments.sandbox_cgroup`).
- **Credentials**: as root, P drops to a dedicated uid/gid (``_SANDBOX_UID_BASE`` + a slot leased for the
  run, no supplementary groups) and sets ``no_new_privs``. A dedicated uid per concurrent run makes
  RLIMIT_NPROC (counted per uid, and never enforced for root) a per-run process limit. Not root: a user
  namespace maps the caller's uid to uid 1000 inside it and P's exec drops every capability.
- **OOM preference**: every sandbox process has ``oom_score_adj`` 1000, so when memory runs out the kernel
  kills sandbox processes before the trainer.
- **rlimits** on P: RLIMIT_AS (``memory_mb``), RLIMIT_CPU (``cpu_time_s``; SIGKILL one second later),
  RLIMIT_NPROC (``max_processes``), RLIMIT_FSIZE (``max_file_mb``), RLIMIT_CORE 0, RLIMIT_NOFILE 1024.
- **Environment**: only ``PATH``, ``LANG``, ``LC_ALL``, ``HOME`` and ``TMPDIR`` (the last two: the working
  directory). Nothing of the trainer's environment passes.

The parent imports it too, for what the two sides share (:data:`MEMORY_ERROR_EXIT_CODE`, :data:`LINK_SEPARATOR`,
:data:`PROGRAM_ENV`).
"""

from __future__ import annotations

import ctypes
import os
import resource
import select
import sys

MEMORY_ERROR_EXIT_CODE = 97
SANDBOX_WORKDIR = "/tmp/work"
_USERNS_UID = 1000
_SETUP_FAILED_EXIT = 125
_NOFILE_LIMIT = 1024
_AUXILIARY_TMPFS_BYTES = 1 << 20
_OOM_SCORE_ADJ = 1000  # the maximum: first in line for the OOM killer
_SIGKILL = 9  # the signal module costs the launcher ~4 ms of start-up (it imports enum)
PROGRAM_ENV = {
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
_MNT_DETACH = 0x2
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41}  # an old system call: numbers differ by arch
LINK_SEPARATOR = "\x1f"
# The device nodes a program gets (bound from the host's /dev), and the usual links into its own /proc.
_DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom")
_DEVICE_LINKS = (("/dev/fd", "/proc/self/fd"), ("/dev/stdin", "/proc/self/fd/0"),
                 ("/dev/stdout", "/proc/self/fd/1"), ("/dev/stderr", "/proc/self/fd/2"))

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
    """The launcher's command line: ``key=value`` words; ``bind_file=``, ``bind_dir=``, ``cover=``,
    ``cgroup_procs=`` and ``link=`` (a path and its target, separated by :data:`LINK_SEPARATOR`) may repeat."""

    def __init__(self, arguments: list[str]) -> None:
        values: dict[str, str] = {}
        repeated: dict[str, list[str]] = {name: [] for name in ("bind_file", "bind_dir", "link", "cover", "cgroup_procs")}
        for argument in arguments:
            key, _, value = argument.partition("=")
            if key in repeated:
                repeated[key].append(value)
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
        self.cgroup_procs = tuple(repeated["cgroup_procs"])  # one per controller on cgroup v1, one on v2
        self.bind_files = tuple(repeated["bind_file"])
        self.bind_dirs = tuple(repeated["bind_dir"])
        self.links = tuple(tuple(link.split(LINK_SEPARATOR, 1)) for link in repeated["link"])
        self.covered = tuple(repeated["cover"])


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

    def pivot_root(self, new_root: str, put_old: str) -> None:
        number = _SYS_PIVOT_ROOT.get(os.uname().machine)
        if number is None:
            raise OSError(0, f"pivot_root: no system call number known for {os.uname().machine}")
        self._check(self._libc.syscall(number, new_root.encode(), put_old.encode()), "pivot_root")

    def detach(self, target: str) -> None:
        self._check(self._libc.umount2(target.encode(), _MNT_DETACH), f"umount {target}")

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
        for procs in options.cgroup_procs:  # the run's own cgroup(s), made by the parent: every process is born in it
            with open(procs, "w") as file:
                file.write("0")
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
        os.umask(0o022)  # the skeleton's directories must be traversable by the program's uid
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
    """Make a fresh tmpfs the root, holding only the allow list; see the module docstring.

    The new root is assembled at ``/tmp`` (any existing directory would do) while the host's tree is still
    reachable: the runtime paths are opened first, the fresh procfs is mounted while the host's ``/proc`` is
    still visible (the kernel requires that in a user namespace). Then ``pivot_root`` swaps the roots and the
    host's tree is detached. ``system_owner`` owns the read-only skeleton (root, or the mapped uid in a user
    namespace, where uid 0 is unmapped); ``sandbox_owner`` owns the writable directories.
    """
    libc.mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing we mount propagates back to the host
    sources = {path: _open_runtime_path(path) for path in (*options.bind_dirs, *options.bind_files)}
    sources.update({device: os.open(device, os.O_PATH) for device in _DEVICES})
    new_root = "/tmp"
    libc.tmpfs(new_root, size=_AUXILIARY_TMPFS_BYTES, mode="0755", owner=system_owner)
    for path, fd in sources.items():
        target = new_root + path
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            os.mkdir(target, 0o755)
        else:
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
        libc.mount(f"/proc/self/fd/{fd}", target, None, _MS_BIND | _MS_REC)
        os.close(fd)
    for path in options.covered:
        libc.tmpfs(new_root + path, size=_AUXILIARY_TMPFS_BYTES, mode="0755", owner=system_owner)
    for path in sources:
        libc.set_readonly(new_root + path, recursive=True)  # device nodes stay writable on a read-only mount
    for path, link_target in (*options.links, *_DEVICE_LINKS):
        os.makedirs(new_root + os.path.dirname(path), mode=0o755, exist_ok=True)
        os.symlink(link_target, new_root + path)
    os.mkdir(new_root + "/proc", 0o555)
    _mount_fresh_proc(libc, new_root + "/proc")
    _mount_private_directories(libc, options, new_root, system_owner, sandbox_owner)
    os.chdir(new_root)
    libc.pivot_root(".", ".")  # the old root now lies on top of the new one, at the same place
    libc.detach(".")
    os.chdir("/")
    for skeleton in ("/", "/tmp"):
        libc.set_readonly(skeleton, recursive=False)


def _mount_private_directories(libc: _Libc, options: _LaunchOptions, new_root: str, system_owner: int,
                               sandbox_owner: int) -> None:
    """/tmp holding the working directory, and /dev/shm: tmpfs, all of them."""
    os.mkdir(new_root + "/tmp", 0o755)
    libc.tmpfs(new_root + "/tmp", size=_AUXILIARY_TMPFS_BYTES, mode="0755", owner=system_owner)
    os.mkdir(new_root + SANDBOX_WORKDIR, 0o700)
    libc.tmpfs(new_root + SANDBOX_WORKDIR, size=options.workdir_bytes, mode="0700", owner=sandbox_owner)
    os.mkdir(new_root + "/dev/shm", 0o700)
    libc.tmpfs(new_root + "/dev/shm", size=options.fsize_bytes, mode="0700", owner=sandbox_owner)


def _open_runtime_path(path: str) -> int:
    try:
        return os.open(path, os.O_PATH)
    except PermissionError as exc:
        # Root without CAP_SYS_ADMIN: the launcher already is the sandbox uid and cannot reach the interpreter.
        raise PermissionError(exc.errno, f"the sandbox uid cannot reach the interpreter's {path}; "
                                         "pass a world-readable python_executable (e.g. /usr/bin/python3)") from exc


def _mount_fresh_proc(libc: _Libc, target: str) -> None:
    """procfs of this PID namespace. In a user namespace the kernel may refuse (containers mask parts of
    /proc); then an empty tmpfs is mounted instead, which still hides the host's processes."""
    try:
        libc.mount("proc", target, "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    except PermissionError:
        libc.mount("tmpfs", target, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC | _MS_RDONLY, "size=4096")


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
        os.execve(options.python, argv, PROGRAM_ENV)
    except OSError as exc:
        _report(options.status_fd, "E", f"cannot start the program: {exc}")
        os._exit(_SETUP_FAILED_EXIT)


if __name__ == "__main__":
    launcher_main(sys.argv[1:])
