"""Per-run cgroups of the sandbox: finding the cgroup v2 base, the limits written, the fallback to rlimits with
one warning, and (only where this machine offers delegable cgroup v2 controllers) the limits at work."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from cipo_nemo.environments import sandbox_cgroup
from cipo_nemo.environments.sandbox import run_program
from cipo_nemo.environments.sandbox_cgroup import CgroupLimits, cgroup2_base

HYBRID_MOUNTINFO = """\
30 24 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec - tmpfs tmpfs ro,mode=755
38 30 0:33 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
UNIFIED_MOUNTINFO = "29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw\n"
# A container whose cgroup namespace root is the host's /machine.slice/c1: the mount shows only that subtree.
CONTAINER_MOUNTINFO = "501 500 0:26 /machine.slice/c1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"


@pytest.mark.parametrize(
    ("mountinfo", "own", "expected"),
    [
        (HYBRID_MOUNTINFO, "4:memory:/a\n0::/\n", "/sys/fs/cgroup/unified"),
        (UNIFIED_MOUNTINFO, "0::/user.slice/user-0.slice/session-1.scope\n",
         "/sys/fs/cgroup/user.slice/user-0.slice/session-1.scope"),
        (CONTAINER_MOUNTINFO, "0::/machine.slice/c1/trainer\n", "/sys/fs/cgroup/trainer"),
        (CONTAINER_MOUNTINFO, "0::/elsewhere\n", None),  # our cgroup is not under what the mount shows
        ("38 30 0:33 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n", "4:memory:/\n", None),  # v1 only
    ],
)
def test_cgroup2_base_is_our_own_cgroup_in_the_v2_mount(mountinfo: str, own: str, expected: str | None) -> None:
    assert cgroup2_base(mountinfo, own) == expected


def test_limits_are_written_as_the_kernel_expects() -> None:
    limits = CgroupLimits(memory_bytes=300 << 20, pids=66, cpu_cores=1.5)
    assert limits.files() == {
        "memory.max": str(300 << 20),
        "memory.swap.max": "0",
        "memory.oom.group": "1",
        "pids.max": "66",
        "cpu.max": "150000 100000",
    }
    assert CgroupLimits(memory_bytes=1, pids=1, cpu_cores=0.001).files()["cpu.max"] == "1000 100000"


@pytest.fixture
def fresh_cgroup_detection() -> Iterator[None]:
    sandbox_cgroup.sandbox_cgroup_base.cache_clear()
    yield
    sandbox_cgroup.sandbox_cgroup_base.cache_clear()


def test_without_cgroups_the_sandbox_warns_once_and_keeps_its_rlimits(
        fresh_cgroup_detection: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def unusable() -> str:
        raise OSError("cgroup /sys/fs/cgroup/x does not offer the memory controller(s)")

    monkeypatch.setattr(sandbox_cgroup, "_delegating_base", unusable)
    fork_children = "import os, time\nn = 0\nfor _ in range(20):\n    try:\n        pid = os.fork()\n" \
                    "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(60)\n" \
                    "        os._exit(0)\n    n += 1\nprint(n)\n"
    with caplog.at_level(logging.WARNING, logger=sandbox_cgroup.__name__):
        first = run_program(fork_children, max_processes=4)
        second = run_program("print('second')")
    assert (first.status, first.stdout) == ("ok", "3\n")  # RLIMIT_NPROC still bounds the run
    assert (second.status, second.stdout) == ("ok", "second\n")
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "cgroup v2 limits unavailable" in warnings[0] and "memory controller" in warnings[0]


def test_this_machines_cgroup_detection_answers_without_raising(fresh_cgroup_detection: None) -> None:
    base = sandbox_cgroup.sandbox_cgroup_base()
    assert base is None or os.path.isfile(os.path.join(base, "cgroup.subtree_control"))


needs_cgroups = pytest.mark.skipif(
    sandbox_cgroup.sandbox_cgroup_base() is None,
    reason="this machine has no delegable cgroup v2 memory/pids/cpu controllers (the rlimit fallback is tested)",
)


@needs_cgroups
def test_tmpfs_pages_count_against_the_runs_memory_limit() -> None:
    # 200 MiB into /dev/shm, far below RLIMIT_AS (it limits address space, not tmpfs) but above memory.max.
    source = ("chunk = b'x' * (1 << 20)\nwith open('/dev/shm/fill', 'wb') as file:\n"
              "    for _ in range(200):\n        file.write(chunk)\nprint('filled')\n")
    result = run_program(source, memory_mb=64, max_file_mb=256)
    assert result.status == "memory", result


@needs_cgroups
def test_pids_limit_bounds_threads_of_the_run() -> None:
    source = ("import threading, time\nstarted = 0\nfor _ in range(100):\n    try:\n"
              "        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
              "    except RuntimeError:\n        break\n    started += 1\nprint(started)\nimport os\nos._exit(0)\n")
    result = run_program(source, max_processes=10)
    assert result.status == "ok", result
    assert int(result.stdout) <= 9


@needs_cgroups
def test_cpu_quota_holds_busy_threads_to_their_share() -> None:
    source = ("import os, threading, time\ndef spin():\n    end = time.monotonic() + 2\n"
              "    while time.monotonic() < end:\n        pass\n"
              "threads = [threading.Thread(target=spin) for _ in range(4)]\n"
              "start = time.monotonic()\n[t.start() for t in threads]\n[t.join() for t in threads]\n"
              "cpu = sum(os.times()[:2])\nprint(cpu / (time.monotonic() - start))\n")
    result = run_program(source, cpu_cores=0.5, timeout_s=30)
    assert result.status == "ok", result
    assert float(result.stdout) < 0.75  # 4 busy threads, held near half a core


def test_each_run_gets_its_own_cgroup_which_the_launcher_joins_and_which_is_removed(
        fresh_cgroup_detection: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A stand-in for a delegated cgroup directory: plain files, so this checks the plumbing (parent writes the
    # limits, the launcher writes itself into cgroup.procs before anything else, the run's directory goes),
    # not the kernel's enforcement, which the tests above check where the machine allows.
    seen: dict[str, dict[str, str]] = {}

    def remove(path: str) -> None:
        seen[os.path.basename(path)] = {name: (Path(path) / name).read_text() for name in os.listdir(path)}
        shutil.rmtree(path)

    monkeypatch.setattr(sandbox_cgroup, "_delegating_base", lambda: str(tmp_path))
    monkeypatch.setattr(sandbox_cgroup, "_remove", remove)
    result = run_program("print('inside')", memory_mb=100, max_processes=5, max_file_mb=2, cpu_cores=0.25)
    assert (result.status, result.stdout) == ("ok", "inside\n")
    assert len(seen) == 1 and os.listdir(tmp_path) == []
    (name, files), = seen.items()
    assert name.startswith(f"cipo-sandbox-{os.getpid()}-")
    source_bytes = len("print('inside')")
    memory = (100 << 20) + (2 << 20) + source_bytes + (1 << 20) + (2 << 20) + (64 << 20)
    assert files == {"cgroup.procs": "0", "memory.max": str(memory), "memory.swap.max": "0",
                     "memory.oom.group": "1", "pids.max": "7", "cpu.max": "25000 100000"}
