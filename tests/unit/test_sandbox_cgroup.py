"""Per-run cgroups of the sandbox: finding the cgroup v2 or v1 base, the limits written, the fallback to rlimits
with one warning, and (where this machine offers delegable v2 or writable v1 controllers) the limits at work."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from cipo_nemo.environments import sandbox_cgroup
from cipo_nemo.environments.sandbox import run_program
from cipo_nemo.environments.sandbox_cgroup import CgroupBase, CgroupLimits, cgroup1_bases, cgroup2_base

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
    assert limits.v1_files() == {
        "memory": {"memory.limit_in_bytes": str(300 << 20), "memory.memsw.limit_in_bytes": str(300 << 20)},
        "pids": {"pids.max": "66"},
        "cpu": {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "150000"},
    }


# A legacy (v1) host as many containers see it: cpu and cpuacct co-mounted, our memory cgroup is a sub-path,
# freezer mounted read-only.
LEGACY_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer ro,relatime - cgroup cgroup rw,freezer
39 31 0:36 /job_7 /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
LEGACY_OWN = "9:pids:/job_7/step_0\n6:freezer:/\n4:memory:/process_api/abc\n2:cpu,cpuacct:/\n0::/\n"


def test_cgroup1_bases_are_our_cgroups_in_each_writable_hierarchy() -> None:
    assert cgroup1_bases(LEGACY_MOUNTINFO, LEGACY_OWN) == {
        "memory": "/sys/fs/cgroup/memory/process_api/abc",
        "pids": "/sys/fs/cgroup/pids/step_0",
        "cpu": "/sys/fs/cgroup/cpu,cpuacct",
    }
    read_only = LEGACY_MOUNTINFO.replace("/sys/fs/cgroup/memory rw,", "/sys/fs/cgroup/memory ro,")
    assert "memory" not in cgroup1_bases(read_only, LEGACY_OWN)
    assert cgroup1_bases(UNIFIED_MOUNTINFO, "0::/user.slice\n") == {}  # a pure v2 host has no v1 hierarchy


@pytest.fixture
def fresh_cgroup_detection() -> Iterator[None]:
    sandbox_cgroup.sandbox_cgroup_base.cache_clear()
    yield
    sandbox_cgroup.sandbox_cgroup_base.cache_clear()


def test_without_cgroups_the_sandbox_warns_once_and_keeps_its_rlimits(
        fresh_cgroup_detection: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def unusable_v2() -> CgroupBase:
        raise OSError("cgroup v2: /sys/fs/cgroup/x does not offer the memory controller(s)")

    def unusable_v1() -> CgroupBase:
        raise OSError("cgroup v1: no writable pids hierarchy is mounted")

    monkeypatch.setattr(sandbox_cgroup, "_delegating_base", unusable_v2)
    monkeypatch.setattr(sandbox_cgroup, "_cgroup1_base", unusable_v1)
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
    assert "cgroup limits unavailable" in warnings[0] and "memory controller" in warnings[0]
    assert "no writable pids hierarchy" in warnings[0]


def test_this_machines_cgroup_detection_answers_without_raising(fresh_cgroup_detection: None) -> None:
    base = sandbox_cgroup.sandbox_cgroup_base()
    if base is not None:
        expected_file = {2: "cgroup.subtree_control", 1: "cgroup.procs"}[base.version]
        assert all(os.path.isfile(os.path.join(d, expected_file)) for d in base.directories.values()), base


needs_cgroups = pytest.mark.skipif(
    sandbox_cgroup.sandbox_cgroup_base() is None,
    reason="this machine has neither delegable cgroup v2 nor writable cgroup v1 memory/pids/cpu controllers "
           "(the rlimit fallback is tested)",
)


# 60 MiB in /dev/shm and 60 MiB in the working directory (tmpfs), then four processes holding 60 MiB each: every
# process stays far below its RLIMIT_AS (memory_mb), so rlimits alone let it run; the run as a whole (~370 MiB)
# exceeds its cgroup's memory limit (memory_mb + both tmpfs sizes + 64 MiB, ~321 MiB) only because tmpfs pages
# and all processes count together.
MEMORY_HUNGRY_RUN = (
    "import os, time\nchunk = b'x' * (1 << 20)\n"
    "for path in ('/dev/shm/fill', 'fill'):\n    with open(path, 'wb') as file:\n"
    "        for _ in range(60):\n            file.write(chunk)\n"
    "children = []\nfor _ in range(4):\n    pid = os.fork()\n    if pid == 0:\n"
    "        held = b'y' * (60 << 20)\n        time.sleep(2)\n        os._exit(0)\n    children.append(pid)\n"
    "print(sorted(os.waitpid(pid, 0)[1] for pid in children))\n"
)


@needs_cgroups
def test_tmpfs_pages_and_all_processes_count_against_the_runs_memory_limit(
        fresh_cgroup_detection: None, monkeypatch: pytest.MonkeyPatch) -> None:
    limited = run_program(MEMORY_HUNGRY_RUN, memory_mb=128, max_file_mb=64, max_processes=8, timeout_s=30)
    assert limited.status == "memory", limited
    monkeypatch.setattr(sandbox_cgroup, "_delegating_base", lambda: (_ for _ in ()).throw(OSError("off")))
    monkeypatch.setattr(sandbox_cgroup, "_cgroup1_base", lambda: (_ for _ in ()).throw(OSError("off")))
    sandbox_cgroup.sandbox_cgroup_base.cache_clear()
    rlimits_only = run_program(MEMORY_HUNGRY_RUN, memory_mb=128, max_file_mb=64, max_processes=8, timeout_s=30)
    assert (rlimits_only.status, rlimits_only.stdout) == ("ok", "[0, 0, 0, 0]\n"), rlimits_only


@needs_cgroups
def test_pids_limit_bounds_threads_of_the_run() -> None:
    source = ("import threading, time\nstarted = 0\nfor _ in range(100):\n    try:\n"
              "        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
              "    except RuntimeError:\n        break\n    started += 1\nprint(started, flush=True)\nimport os\nos._exit(0)\n")
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

    monkeypatch.setattr(sandbox_cgroup, "_delegating_base", lambda: CgroupBase(2, {"": str(tmp_path)}))
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


def test_on_cgroup_v1_the_launcher_joins_one_cgroup_per_controller(
        fresh_cgroup_detection: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Plain directories standing in for the three v1 hierarchies: the plumbing, not the kernel's enforcement.
    parents = {name: tmp_path / name for name in ("memory", "pids", "cpu")}
    for directory in parents.values():
        directory.mkdir()
    seen: dict[str, dict[str, str]] = {}

    def remove(path: str) -> None:
        seen[Path(path).parent.name] = {name: (Path(path) / name).read_text() for name in os.listdir(path)}
        shutil.rmtree(path)

    monkeypatch.setattr(sandbox_cgroup, "_delegating_base", lambda: (_ for _ in ()).throw(OSError("no v2")))
    monkeypatch.setattr(sandbox_cgroup, "_cgroup1_base",
                        lambda: CgroupBase(1, {name: str(path) for name, path in parents.items()}))
    monkeypatch.setattr(sandbox_cgroup, "_remove", remove)
    result = run_program("print('inside')", memory_mb=100, max_processes=5, max_file_mb=2, cpu_cores=0.25)
    assert (result.status, result.stdout) == ("ok", "inside\n")
    assert all(os.listdir(path) == [] for name, path in parents.items() if name != "memory")
    memory = str((100 << 20) + (2 << 20) + len("print('inside')") + (1 << 20) + (2 << 20) + (64 << 20))
    # memory.memsw.limit_in_bytes is absent in a plain directory: swap accounting off, skipped.
    assert seen == {"memory": {"cgroup.procs": "0", "memory.limit_in_bytes": memory},
                    "pids": {"cgroup.procs": "0", "pids.max": "7"},
                    "cpu": {"cgroup.procs": "0", "cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "25000"}}
