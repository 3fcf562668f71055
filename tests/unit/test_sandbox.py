"""The code sandbox: normal runs, outcome mapping, and hostile programs that must end right and leave nothing.

Every sandbox call runs in a daemon thread with a bounded wait (``run_bounded``), so a broken sandbox fails
the test instead of hanging CI. After every test, no process of the test's own tree and no process of a
sandbox uid may remain (autouse fixture). CI runs these as root; two tests run the sandbox as an
unprivileged user and as root without CAP_SYS_ADMIN (the user-namespace mode).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from cipo_nemo.environments import sandbox, sandbox_runtime
from cipo_nemo.environments.sandbox import (
    MEMORY_ERROR_EXIT_CODE,
    TRUNCATION_MARKER,
    SandboxLimits,
    SandboxPool,
    SandboxRequest,
    SandboxResult,
    run_program,
)

PROJECT_DIR = Path(__file__).resolve().parents[2]
DATASET_FILE = PROJECT_DIR / "conf" / "data" / "code_stdio_sample.jsonl"
# Host directories that are no part of a Python runtime; before the allow-list view a program could read them.
HOST_ONLY = ("/etc", "/home", "/run", "/var", "/opt", "/srv", "/work", str(PROJECT_DIR), sys.prefix)
BOUND_S = 60.0
UNPRIVILEGED_UID = 54321


def run_bounded(source: str, **options: object) -> SandboxResult:
    """run_program, failing the test if it does not return within BOUND_S."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["result"] = run_program(source, **options)  # type: ignore[arg-type]
        except BaseException as exc:  # handed to the test thread below
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(BOUND_S)
    if thread.is_alive():
        pytest.fail(f"run_program did not return within {BOUND_S} s")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"]  # type: ignore[return-value]


def program(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, real uid, command line) for every process still readable in /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat_line = Path(f"/proc/{entry}/stat").read_text()
            status = Path(f"/proc/{entry}/status").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited while we looked
            continue
        parent = int(stat_line.rsplit(")", 1)[1].split()[1])
        uid_match = re.search(r"^Uid:\s+(\d+)", status, flags=re.MULTILINE)
        assert uid_match is not None
        table[int(entry)] = (parent, int(uid_match.group(1)), cmdline)
    return table


def files_named(name: str, directory: str) -> list[str]:
    return [os.path.join(root, name) for root, _, files in os.walk(directory) if name in files]


def descendants_of(pid: int, table: dict[int, tuple[int, int, str]]) -> set[int]:
    found: set[int] = set()
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, (ppid, _, _) in table.items() if ppid == parent and child not in found]
        found.update(children)
        frontier.extend(children)
    return found


def sandbox_uid_processes(table: dict[int, tuple[int, int, str]]) -> set[int]:
    low = sandbox._SANDBOX_UID_BASE
    high = low + sandbox._SANDBOX_UID_SLOTS
    return {pid for pid, (_, uid, _) in table.items() if low <= uid < high}


@pytest.fixture(autouse=True)
def machine_left_as_it_was() -> Iterator[None]:
    # Children the test process already had (e.g. other suites' worker pools) are not the sandbox's.
    before = descendants_of(os.getpid(), process_table())
    yield
    table = process_table()
    assert descendants_of(os.getpid(), table) - before == set(), "a sandboxed process outlived its run"
    assert sandbox_uid_processes(table) == set(), "a process of a sandbox uid is still running"


# ---------------------------------------------------------------------------------------------------------
# Normal programs and the outcome mapping


def test_program_reads_stdin_and_writes_both_streams() -> None:
    source = program("""
        import sys
        data = sys.stdin.read()
        print(data.upper(), end="")
        print("to stderr", file=sys.stderr)
    """)
    result = run_bounded(source, stdin="abc\ndef\n")
    assert (result.status, result.returncode) == ("ok", 0)
    assert result.stdout == "ABC\nDEF\n"
    assert result.stderr == "to stderr\n"
    assert result.wall_s > 0


def test_nonzero_exit_and_exceptions_are_errors() -> None:
    exited = run_bounded("import sys\nsys.exit(3)\n")
    assert (exited.status, exited.returncode) == ("error", 3)
    raised = run_bounded("print('before')\n1 / 0\n")
    assert (raised.status, raised.returncode) == ("error", 1)
    assert raised.stdout == "before\n"
    assert raised.stderr.rstrip().endswith("ZeroDivisionError: division by zero")
    assert 'main.py", line 2' in raised.stderr  # tracebacks point into the program's own lines
    syntax = run_bounded("def broken(:\n")
    assert syntax.status == "error" and "SyntaxError" in syntax.stderr


def test_program_runs_as_main_with_a_clean_namespace() -> None:
    source = program("""
        import sys
        print(__name__, sorted(name for name in globals() if not name.startswith("__")), sys.argv)
    """)
    result = run_bounded(source)
    assert result.stdout == "__main__ ['sys'] ['/tmp/work/main.py']\n"


def test_program_gets_only_the_standard_streams() -> None:
    # The status pipe, the program's memfd and the launcher's descriptors are all closed before it runs;
    # descriptor 3 is the one listdir itself opens.
    result = run_bounded("import os\nprint(sorted(os.listdir('/proc/self/fd')))\n")
    assert result.stdout == "['0', '1', '2', '3']\n"


def test_sandbox_processes_are_the_first_victims_of_the_oom_killer() -> None:
    assert run_bounded("print(open('/proc/self/oom_score_adj').read())").stdout == "1000\n\n"


def test_signal_death_is_killed() -> None:
    result = run_bounded("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    assert (result.status, result.returncode) == ("killed", -signal.SIGSEGV)


def _record(**fields: object) -> sandbox._RunRecord:
    return sandbox._RunRecord(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("record", "stderr_tail", "expected"),
    [
        (_record(started=True, wait_status=0), "", ("ok", 0)),
        (_record(started=True, wait_status=3 << 8), "", ("error", 3)),
        (_record(started=True, wait_status=MEMORY_ERROR_EXIT_CODE << 8), "", ("memory", MEMORY_ERROR_EXIT_CODE)),
        (_record(started=True, wait_status=1 << 8), "MemoryError\n", ("memory", 1)),
        (_record(started=True, wait_status=signal.SIGXCPU, cpu_s=2.0), "", ("timeout", -signal.SIGXCPU)),
        (_record(started=True, wait_status=signal.SIGKILL, cpu_s=3.01), "", ("timeout", -signal.SIGKILL)),
        (_record(started=True, wait_status=signal.SIGKILL, cpu_s=0.2), "", ("killed", -signal.SIGKILL)),
        (_record(started=True, wait_status=signal.SIGSEGV), "", ("killed", -signal.SIGSEGV)),
        (_record(started=True, timed_out=True), "", ("timeout", None)),
        (_record(started=True), "", ("killed", None)),
        (_record(started=False, wait_status=0), "", ("sandbox_error", None)),
        (_record(started=False, setup_error="mount failed"), "", ("sandbox_error", None)),
    ],
)
def test_outcome_mapping(record: sandbox._RunRecord, stderr_tail: str, expected: tuple[str, int | None]) -> None:
    assert sandbox._classify(record, 3, stderr_tail) == expected


def test_invalid_arguments_are_caller_errors() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        run_program("pass", timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        run_program("pass", memory_mb=8)
    with pytest.raises(ValueError, match="cpu_time_s"):
        run_program("pass", cpu_time_s=0)
    with pytest.raises(ValueError, match="cpu_cores"):
        run_program("pass", cpu_cores=0)
    with pytest.raises(ValueError, match="max_workers"):
        SandboxPool(0)


def test_default_cpu_limit_follows_the_wall_timeout() -> None:
    assert SandboxLimits(timeout_s=2.5).effective_cpu_time_s == 4
    assert SandboxLimits(timeout_s=3).effective_cpu_time_s == 4
    assert SandboxLimits(timeout_s=3, cpu_time_s=1).effective_cpu_time_s == 1


def test_missing_interpreter_is_a_sandbox_error_not_a_program_error() -> None:
    result = run_bounded("print('never')", python_executable="/nonexistent/bin/python3")
    assert (result.status, result.returncode, result.stdout) == ("sandbox_error", None, "")
    assert "cannot start the program" in result.stderr


def test_pool_keeps_order_and_bounds_concurrency() -> None:
    requests = [SandboxRequest(source=f"print({index} * {index})") for index in range(6)]
    running = 0
    most_running = 0
    lock = threading.Lock()

    def counted(request: SandboxRequest) -> SandboxResult:
        nonlocal running, most_running
        with lock:
            running += 1
            most_running = max(most_running, running)
        try:
            return sandbox.run_request(request)
        finally:
            with lock:
                running -= 1

    with SandboxPool(2) as pool:
        via_map = pool.map(counted, requests)
        via_run_many = pool.run_many(requests)
    for results in (via_map, via_run_many):
        assert [result.stdout for result in results] == [f"{index * index}\n" for index in range(6)]
    assert most_running == 2


# ---------------------------------------------------------------------------------------------------------
# The program's view of the machine


def test_working_directory_is_private_and_disappears() -> None:
    source = program("""
        import os, stat
        info = os.stat(".")
        print(os.getcwd(), oct(stat.S_IMODE(info.st_mode)), info.st_uid == os.getuid() != 0, sorted(os.listdir(".")))
        with open("left_behind.txt", "w") as file:
            file.write("x")
    """)
    first = run_bounded(source)
    second = run_bounded(source)
    assert first.stdout == "/tmp/work 0o700 True ['main.py']\n"
    assert second.stdout == first.stdout  # the file of the first run is gone
    assert first.status == second.status == "ok"


def test_environment_holds_no_secret_of_the_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = f"cipo-secret-{secrets.token_hex(8)}"
    monkeypatch.setenv("CIPO_SECRET", secret)
    source = program(f"""
        import os
        print(sorted(os.environ.items()))
        for path in ("/proc/{os.getpid()}/environ", "/proc/1/environ", "/proc/self/environ"):
            try:
                print(path, open(path, "rb").read())
            except OSError as error:
                print(path, type(error).__name__)
    """)
    result = run_bounded(source)
    assert result.status == "ok"
    assert secret not in result.stdout + result.stderr
    assert result.stdout.splitlines()[0] == (
        "[('HOME', '/tmp/work'), ('LANG', 'C.UTF-8'), ('LC_ALL', 'C.UTF-8'), "
        "('PATH', '/usr/local/bin:/usr/bin:/bin'), ('TMPDIR', '/tmp/work')]"
    )
    # The test process is not even visible: the program has its own PID namespace and procfs (unless the test
    # itself runs as PID 1 or 2 of a container, where the path names a sandbox process instead).
    assert f"/proc/{os.getpid()}/environ FileNotFoundError" in result.stdout or os.getpid() in (1, 2)
    assert "/proc/1/environ PermissionError" in result.stdout  # the namespace init is root's


def test_host_processes_are_invisible_and_the_system_is_read_only() -> None:
    source = program(f"""
        import os
        HOST_ONLY = {HOST_ONLY!r}
        print(sorted(int(entry) for entry in os.listdir("/proc") if entry.isdigit()))
        print(os.statvfs("/").f_flag & os.ST_RDONLY == os.ST_RDONLY, [os.path.exists(path) for path in HOST_ONLY])
        try:
            open("/etc/shadow").read()
        except OSError as error:
            print("shadow", type(error).__name__)
    """)
    result = run_bounded(source)
    lines = result.stdout.splitlines()
    assert lines[0] == "[1, 2]"  # the namespace init and the program itself
    assert lines[1] == f"True {[False] * len(HOST_ONLY)}"
    assert lines[2] == "shadow FileNotFoundError"


def test_writes_outside_the_working_directory_fail_and_leave_nothing() -> None:
    nonce = secrets.token_hex(8)
    targets = {
        "tmp": f"/tmp/cipo_escape_{nonce}",
        "var_tmp": f"/var/tmp/cipo_escape_{nonce}",
        "project": str(PROJECT_DIR / f"cipo_escape_{nonce}"),
        "etc": f"/etc/cipo_escape_{nonce}",
        "shm": f"/dev/shm/cipo_escape_{nonce}",  # a private tmpfs: allowed inside, invisible outside
    }
    source = program(f"""
        targets = {targets!r}
        for name, path in targets.items():
            try:
                with open(path, "w") as file:
                    file.write("escaped")
                print(name, "written")
            except OSError:  # read-only mount, or (checkout under /tmp) a path the private /tmp does not have
                print(name, "blocked")
    """)
    result = run_bounded(source)
    assert result.status == "ok"
    assert result.stdout.splitlines() == [
        "tmp blocked", "var_tmp blocked", "project blocked", "etc blocked", "shm written",
    ]
    for path in targets.values():
        assert not os.path.exists(path), path


def test_network_is_unreachable_even_on_loopback() -> None:
    abstract_name = f"\0cipo-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as abstract_server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.5)
        abstract_server.bind(abstract_name)
        abstract_server.listen()
        abstract_server.settimeout(0.5)
        port = server.getsockname()[1]
        source = program(f"""
            import socket
            print(socket.if_nameindex())
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=3)
                print("connected")
            except OSError as error:
                print("tcp", type(error).__name__)
            try:
                socket.socket(socket.AF_UNIX).connect({abstract_name!r})
                print("connected")
            except OSError as error:
                print("abstract unix", type(error).__name__)
        """)
        result = run_bounded(source)
        for listener in (server, abstract_server):
            with pytest.raises(TimeoutError):
                listener.accept()  # nobody ever connected
    assert result.status == "ok"
    assert result.stdout.splitlines() == ["[(1, 'lo')]", "tcp OSError", "abstract unix ConnectionRefusedError"]


# ---------------------------------------------------------------------------------------------------------
# The allow-list view: the runtime and the working directory, nothing else of the host


@pytest.fixture
def world_readable_host_file() -> Iterator[Path]:
    """A world-readable file in a world-readable directory under /var/tmp, outside every formerly hidden path."""
    directory = Path(f"/var/tmp/cipo_visible_{secrets.token_hex(8)}")
    directory.mkdir(mode=0o755)
    secret = directory / "secret.txt"
    secret.write_text(f"host secret {secrets.token_hex(8)}\n")
    secret.chmod(0o644)
    try:
        yield secret
    finally:
        secret.unlink()
        directory.rmdir()


def _read_attempts(paths: list[str]) -> list[str]:
    """What a sandboxed program gets when it lists or reads each path: 'listed', 'read' or the error's name."""
    source = program(f"""
        import os
        for path in {paths!r}:
            try:
                if os.path.isdir(path):
                    os.listdir(path)
                    print("listed")
                else:
                    open(path, "rb").read()
                    print("read")
            except OSError as error:
                print(type(error).__name__)
    """)
    result = run_bounded(source)
    assert result.status == "ok", result
    return result.stdout.splitlines()


def test_world_readable_host_file_is_not_there(world_readable_host_file: Path) -> None:
    attempts = _read_attempts([str(world_readable_host_file), str(world_readable_host_file.parent), "/var/tmp"])
    assert attempts == ["FileNotFoundError"] * 3


def test_checkout_dataset_and_venv_are_not_there() -> None:
    paths = [str(DATASET_FILE), str(Path(__file__).resolve()), str(PROJECT_DIR), sys.prefix]
    assert all(os.path.exists(path) for path in paths)
    assert _read_attempts(paths) == ["FileNotFoundError"] * len(paths)


def test_root_holds_only_the_runtime_the_working_directory_and_a_few_devices() -> None:
    source = program("""
        import os
        print(sorted(os.listdir("/")))
        print(sorted(os.listdir("/dev")))
        print(sorted(os.listdir("/tmp")))
    """)
    result = run_bounded(source)
    assert result.status == "ok", result
    view = sandbox_runtime.runtime_view(os.path.realpath(sys.executable))
    runtime_tops = {path.split("/")[1] for path in (*view.files, *view.directories, *(link for link, _ in view.links))}
    root, dev, tmp = (eval(line) for line in result.stdout.splitlines())  # noqa: S307 (our own program's output)
    assert set(root) == {"dev", "proc", "tmp"} | runtime_tops
    # host directories are not there, unless their top-level name is one the view has anyway (a checkout under /tmp
    # shares "tmp" with the private /tmp; the paths themselves: test_checkout_dataset_and_venv_are_not_there)
    view_tops = {"dev", "proc", "tmp"} | runtime_tops
    assert not set(root) & ({path.split("/")[1] for path in HOST_ONLY} - view_tops)
    assert dev == ["fd", "null", "shm", "stderr", "stdin", "stdout", "urandom", "zero"]
    assert tmp == ["work"]


def test_runtime_is_read_only_and_keeps_no_third_party_packages() -> None:
    view = sandbox_runtime.runtime_view(os.path.realpath(sys.executable))
    targets = [os.path.join(directory, f"cipo_escape_{secrets.token_hex(8)}") for directory in view.directories]
    source = program(f"""
        import os, sysconfig
        for path in {targets!r}:
            try:
                open(path, "w")
                print("written")
            except OSError as error:
                print(type(error).__name__)
        site = sysconfig.get_path("purelib")
        print(os.listdir(site) if os.path.isdir(site) else [])
    """)
    result = run_bounded(source)
    assert result.status == "ok", result
    assert result.stdout.splitlines() == ["OSError"] * len(targets) + ["[]"]
    assert not any(os.path.exists(path) for path in targets)


def test_the_standard_library_works_in_the_view() -> None:
    source = program("""
        import ctypes, decimal, hashlib, json, lzma, multiprocessing, os, sqlite3, ssl, time, uuid, zlib
        connection = sqlite3.connect(":memory:")
        print(connection.execute("select 6 * 7").fetchone()[0], len(os.urandom(8)), hashlib.sha256(b"").hexdigest()[:8])
        with multiprocessing.Pool(2) as pool:
            print(pool.map(abs, [-1, -2]))
        print(open("/dev/stdin").read(), end="")
        with open("/dev/null", "w") as sink:
            sink.write("discarded")
    """)
    result = run_bounded(source, stdin="from stdin\n")
    assert result.status == "ok", result
    assert result.stdout == "42 8 e3b0c442\n[1, 2]\nfrom stdin\n"


def test_elf_interpreter_and_symlink_chain_are_found(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "ld.so").write_text("")
    (tmp_path / "lib64").symlink_to("real")
    (tmp_path / "real" / "loader").symlink_to(tmp_path / "real" / "ld.so")
    links = sandbox_runtime._symlinks_on_the_way(str(tmp_path / "lib64" / "loader"))
    loader, real_loader = str(tmp_path / "real" / "loader"), str(tmp_path / "real" / "ld.so")
    assert links == ((str(tmp_path / "lib64"), "real"), (loader, real_loader))
    assert sandbox_runtime._elf_interpreter(os.path.realpath(sys.executable)) is not None
    assert sandbox_runtime._elf_interpreter(str(tmp_path / "real" / "ld.so")) is None


# ---------------------------------------------------------------------------------------------------------
# Hostile programs


def test_infinite_loop_times_out() -> None:
    result = run_bounded("while True:\n    pass\n", timeout_s=1.0)
    assert (result.status, result.returncode) == ("timeout", None)


def test_sleeping_program_hits_the_wall_clock_limit_not_the_cpu_limit() -> None:
    result = run_bounded("import time\nprint('sleeping', flush=True)\ntime.sleep(600)\n", timeout_s=1.0,
                         cpu_time_s=60)
    assert (result.status, result.returncode, result.stdout) == ("timeout", None, "sleeping\n")


def test_cpu_time_limit_ends_a_busy_program() -> None:
    result = run_bounded("while True:\n    pass\n", timeout_s=60.0, cpu_time_s=1)
    # Killed by the kernel (SIGXCPU at the soft limit), not at the 60 s wall deadline: hence a returncode.
    assert result.status == "timeout"
    assert result.returncode in (-signal.SIGXCPU, -signal.SIGKILL)


def test_process_limit_bounds_children() -> None:
    source = program("""
        import os, time
        children = 0
        for _ in range(100):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(600)
                os._exit(0)
            children += 1
        print(children)
    """)
    result = run_bounded(source, max_processes=8)
    assert result.status == "ok"
    assert result.stdout == "7\n"  # 8 processes of the sandbox uid: the program and 7 sleeping children


def test_fork_bomb_is_bounded_and_fully_removed() -> None:
    source = program("""
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """)
    result = run_bounded(source, timeout_s=2.0, max_processes=16)
    assert result.status in ("timeout", "error", "killed")
    # machine_left_as_it_was checks that no process of the bomb remains.


def test_memory_hog_gets_memory() -> None:
    one_shot = run_bounded("data = bytearray(8 * 1024 ** 3)\n", memory_mb=256)
    assert (one_shot.status, one_shot.returncode) == ("memory", MEMORY_ERROR_EXIT_CODE)
    growing = run_bounded("chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 7))\n", memory_mb=256)
    assert (growing.status, growing.returncode) == ("memory", MEMORY_ERROR_EXIT_CODE)


def test_ten_gigabyte_file_write_hits_the_file_size_limit() -> None:
    name = f"cipo_big_{secrets.token_hex(8)}.bin"
    source = program(f"""
        written = 0
        chunk = b"x" * (1 << 20)
        try:
            with open({name!r}, "wb") as file:
                for _ in range(10 * 1024):  # 10 GiB
                    file.write(chunk)
                    file.flush()
                    written += 1
        finally:
            print(written, flush=True)
    """)
    result = run_bounded(source, max_file_mb=8)
    assert result.status == "error"
    assert "File too large" in result.stderr
    assert int(result.stdout) <= 8
    for directory in ("/tmp", "/var/tmp", "/dev/shm", str(PROJECT_DIR)):
        assert files_named(name, directory) == [], "the big file was left on the host"


def test_many_files_are_bounded_by_the_working_directory_size() -> None:
    source = program("""
        written = 0
        try:
            for index in range(1000):
                with open(f"part{index}.bin", "wb") as file:
                    file.write(b"x" * (4 << 20))
                written += 4
        finally:
            print(written, flush=True)
    """)
    result = run_bounded(source, max_file_mb=16)
    assert result.status == "error"
    assert "No space left on device" in result.stderr
    assert int(result.stdout) <= 16


def test_killing_its_parent_harms_nobody() -> None:
    my_pid = os.getpid()
    source = program(f"""
        import os, signal
        for name, pid in (("parent", os.getppid()), ("trainer", {my_pid}), ("everyone", -1)):
            try:
                os.kill(pid, signal.SIGKILL)
                print(name, "signalled")
            except OSError as error:
                print(name, type(error).__name__)
    """)
    result = run_bounded(source)
    assert result.status == "ok"
    # PID 1 of its namespace is root's; the trainer is outside the namespace; kill(-1) reaches only the
    # program's own processes, of which there are none besides itself.
    assert result.stdout.splitlines()[:2] == ["parent PermissionError", "trainer ProcessLookupError"]
    assert run_bounded("print('still fine')").stdout == "still fine\n"


def test_daemon_does_not_outlive_the_run() -> None:
    marker = f"cipo_daemon_{secrets.token_hex(8)}"
    source = program(f"""
        import os, sys, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                heartbeat = ("import time\\n# {marker}\\n"
                             "while True:\\n    open('heartbeat', 'a').write('x')\\n    time.sleep(0.05)\\n")
                os.execv(sys.executable, [sys.executable, "-I", "-S", "-c", heartbeat])
            os._exit(0)
        deadline = time.monotonic() + 20
        while not os.path.exists("heartbeat") and time.monotonic() < deadline:
            time.sleep(0.01)
        print("daemon running" if os.path.exists("heartbeat") else "daemon never started")
    """)
    result = run_bounded(source, timeout_s=30.0)
    assert (result.status, result.stdout) == ("ok", "daemon running\n")
    leftovers = [pid for pid, (_, _, cmdline) in process_table().items() if marker in cmdline]
    assert leftovers == []


def test_printing_100_megabytes_is_truncated_and_costs_the_parent_little() -> None:
    source = program("""
        import sys
        chunk = "x" * (1 << 20)
        for _ in range(100):
            sys.stdout.write(chunk)
    """)
    tracemalloc.start()
    try:
        result = run_bounded(source, timeout_s=30.0)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.status == "ok"
    assert result.stdout == "x" * (1 << 20) + TRUNCATION_MARKER.format(dropped=99 << 20)
    assert peak_bytes < 16 << 20, f"the parent held {peak_bytes} bytes"


# ---------------------------------------------------------------------------------------------------------
# User-namespace mode: an unprivileged trainer, and root without CAP_SYS_ADMIN


def _first_untraversable_ancestor(path: str) -> str | None:
    """The highest directory on ``path`` that users other than its owner cannot enter (no o+x), if any."""
    current = "/"
    for part in path.strip("/").split("/"):
        current = os.path.join(current, part)
        if not os.stat(current).st_mode & stat.S_IXOTH:
            return current
    return None


def _world_usable_python() -> str:
    """An interpreter that a non-root uid can run (the venv's may live under /root)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", sys.executable):
        real = os.path.realpath(candidate)
        if os.path.isfile(real) and _first_untraversable_ancestor(real) is None:
            if os.stat(real).st_mode & stat.S_IXOTH:
                return real
    pytest.fail("no world-executable python3 found (tried /usr/bin/python3, /usr/local/bin/python3)")


_NAMESPACE_PROBE = program("""
    import os, socket, time
    print(os.getuid(), socket.if_nameindex(), sorted(int(e) for e in os.listdir("/proc") if e.isdigit()))
    for path in ("/tmp/cipo_escape_probe", "/etc/cipo_escape_probe"):
        try:
            open(path, "w")
            print("written")
        except OSError as error:
            print(type(error).__name__)
    children = 0
    for _ in range(20):
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            time.sleep(600)
            os._exit(0)
        children += 1
    print(children)
""")


def _run_in_subprocess(command: list[str], *, python_executable: str | None, **popen: object) -> dict[str, object]:
    script = (
        f"import json, sys\nsys.path.insert(0, {str(PROJECT_DIR)!r})\n"
        "from cipo_nemo.environments.sandbox import run_program\n"
        f"result = run_program({_NAMESPACE_PROBE!r}, timeout_s=10, max_processes=6, "
        f"python_executable={python_executable!r})\n"
        "print(json.dumps(result.__dict__))\n"
    )
    completed = subprocess.run([*command, "-c", script], capture_output=True, text=True, timeout=BOUND_S,
                               env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}, cwd="/", check=False,
                               **popen)  # type: ignore[call-overload]
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


# uid 1000 inside; only loopback; only the init and itself in /proc; no writes (a read-only /tmp, and no /etc at
# all); 6 processes: itself + 5 children.
_EXPECTED_PROBE_OUTPUT = "1000 [(1, 'lo')] [1, 2]\nOSError\nFileNotFoundError\n5\n"


def test_unprivileged_user_gets_the_user_namespace_sandbox() -> None:
    python = _world_usable_python()
    result = _run_in_subprocess([python], python_executable=python, user=UNPRIVILEGED_UID,
                                group=UNPRIVILEGED_UID, extra_groups=[])
    assert result["status"] == "ok", result
    assert result["stdout"] == _EXPECTED_PROBE_OUTPUT
    assert [pid for pid, (_, uid, _) in process_table().items() if uid == UNPRIVILEGED_UID] == []


def test_root_without_cap_sys_admin_falls_back_to_a_user_namespace_or_fails_closed() -> None:
    python = _world_usable_python()
    drop_sys_admin = ["setpriv", "--bounding-set", "-sys_admin", sys.executable]
    works = _run_in_subprocess(drop_sys_admin, python_executable=python)
    assert works["status"] == "ok", works
    assert works["stdout"] == _EXPECTED_PROBE_OUTPUT
    if _first_untraversable_ancestor(os.path.realpath(sys.executable)) is not None:
        # Without CAP_SYS_ADMIN the interpreter cannot be bound back from under /root: refuse, do not run.
        refused = _run_in_subprocess(drop_sys_admin, python_executable=None)
        assert refused["status"] == "sandbox_error"
        assert "world-readable python_executable" in str(refused["stderr"])
