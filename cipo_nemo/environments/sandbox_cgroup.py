"""A cgroup per sandboxed run: limits that add up across many programs, where the machine allows it.

rlimits are per process: a run may hold ``memory_mb`` in each of its ``max_processes`` processes, its tmpfs
pages are counted nowhere, and every process may use a whole core. A cgroup bounds the run as a whole:

- memory (v2 ``memory.max``, v1 ``memory.limit_in_bytes``): every page of the run, tmpfs pages (the working
  directory, ``/dev/shm``) included, since the kernel charges a shared-memory page to the cgroup of the process
  that first touches it; no swap (v2 ``memory.swap.max`` 0, v1 ``memory.memsw.limit_in_bytes`` equal to the
  limit where swap accounting exists); on v2 ``memory.oom.group`` 1 (an OOM ends the whole run); an OOM kill
  is reported as ``memory``;
- ``pids.max``: processes and threads of the run, the launcher and the namespace init included;
- CPU (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``): ``cpu_cores`` cores per 100 ms period,
  so a run of busy threads cannot take more than its share from the trainer.

cgroup v2 is used when a cgroup2 hierarchy is mounted and the cgroup this process lives in offers the
``memory``, ``pids`` and ``cpu`` controllers and can delegate them to children (a cgroup that holds processes
itself cannot, except the root). Otherwise cgroup v1 is used when those three controllers are mounted as v1
hierarchies (legacy or hybrid hosts, many HPC clusters and containers) and our cgroup in each is writable: the
run then gets one cgroup per controller. Otherwise :func:`sandbox_cgroup_base` logs one warning, naming the
reasons, and the sandbox keeps to rlimits alone.
"""


from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import secrets
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000
_RMDIR_ATTEMPTS = 50
_RMDIR_PAUSE_S = 0.01


@dataclass(frozen=True)
class CgroupLimits:
    """What one run's cgroup allows."""

    memory_bytes: int
    pids: int
    cpu_cores: float

    def files(self) -> dict[str, str]:
        """Interface file -> value."""
        quota_us = self._quota_us()
        return {
            "memory.max": str(self.memory_bytes),
            "memory.swap.max": "0",
            "memory.oom.group": "1",
            "pids.max": str(self.pids),
            "cpu.max": f"{quota_us} {CPU_PERIOD_US}",
        }

    def v1_files(self) -> dict[str, dict[str, str]]:
        """Controller -> interface file -> value, in the order they must be written (the memory limit before
        the memory+swap limit, which may never be below it)."""
        return {
            "memory": {"memory.limit_in_bytes": str(self.memory_bytes),
                       "memory.memsw.limit_in_bytes": str(self.memory_bytes)},
            "pids": {"pids.max": str(self.pids)},
            "cpu": {"cpu.cfs_period_us": str(CPU_PERIOD_US), "cpu.cfs_quota_us": str(self._quota_us())},
        }

    def _quota_us(self) -> int:
        return max(1000, round(self.cpu_cores * CPU_PERIOD_US))  # the kernel's smallest quota is 1 ms


@dataclass(frozen=True)
class CgroupBase:
    """Where runs' cgroups are made: cgroup v2, one directory; v1, one directory per controller."""

    version: int
    directories: dict[str, str]  # v2: {"": base}; v1: {"memory": ..., "pids": ..., "cpu": ...}


@dataclass(frozen=True)
class RunCgroup:
    """One run's cgroup(s): the launcher writes itself into every ``procs_files`` entry before anything else."""

    version: int
    directories: dict[str, str]

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(directory, "cgroup.procs") for directory in self.directories.values()]


def cgroup2_base(mountinfo: str, own_cgroup: str) -> str | None:
    """This process's cgroup directory in the cgroup v2 hierarchy, from the text of ``/proc/self/mountinfo``
    and ``/proc/self/cgroup``; None when no cgroup v2 file system is mounted."""
    relative = next((line[3:] for line in own_cgroup.splitlines() if line.startswith("0::")), None)
    for line in mountinfo.splitlines():
        fields = line.split()
        separator = fields.index("-")
        if fields[separator + 1] == "cgroup2" and relative is not None:
            root, mount_point = fields[3], fields[4]
            if not relative.startswith(root):  # our cgroup lies outside what this mount shows
                continue
            return os.path.join(mount_point, relative[len(root):].lstrip("/")).rstrip("/") or "/"
    return None


def cgroup1_bases(mountinfo: str, own_cgroup: str) -> dict[str, str]:
    """Controller -> this process's cgroup directory in that controller's writable cgroup v1 hierarchy, for the
    controllers of CONTROLLERS that are mounted as v1 (``/proc/self/cgroup`` lines ``N:memory:/path``; a
    hierarchy may carry several controllers, e.g. ``cpu,cpuacct``)."""
    own: dict[str, str] = {}
    for line in own_cgroup.splitlines():
        _, names, path = line.split(":", 2)
        for name in names.split(","):
            own[name] = path
    found: dict[str, str] = {}
    for line in mountinfo.splitlines():
        fields = line.split()
        separator = fields.index("-")
        if fields[separator + 1] != "cgroup":
            continue
        root, mount_point, mount_options = fields[3], fields[4], fields[5].split(",")
        super_options = fields[separator + 3].split(",")
        for name in CONTROLLERS:
            relative = own.get(name)
            if name in super_options and "rw" in mount_options and relative is not None and relative.startswith(root):
                found.setdefault(name, os.path.join(mount_point, relative[len(root):].lstrip("/")).rstrip("/"))
    return found


@functools.cache
def sandbox_cgroup_base() -> CgroupBase | None:
    """Where each run gets its cgroup(s), or None (warned once, with the reasons) when cgroups are unusable."""
    reasons = []
    for find in (_delegating_base, _cgroup1_base):
        try:
            return find()
        except OSError as exc:
            reasons.append(str(exc))
    logger.warning("cipo sandbox: cgroup limits unavailable (%s); memory, processes and CPU are limited per "
                   "process by rlimits only", "; ".join(reasons))
    return None


def _cgroup1_base() -> CgroupBase:
    with open("/proc/self/mountinfo") as mountinfo, open("/proc/self/cgroup") as own:
        bases = cgroup1_bases(mountinfo.read(), own.read())
    missing = [name for name in CONTROLLERS if name not in bases]
    if missing:
        raise OSError(errno.ENOENT, f"cgroup v1: no writable {', '.join(missing)} hierarchy is mounted")
    for name, directory in bases.items():
        if not os.access(directory, os.W_OK):
            raise OSError(errno.EACCES, f"cgroup v1: cannot create cgroups in {directory} ({name})")
    return CgroupBase(version=1, directories={name: bases[name] for name in CONTROLLERS})


def _delegating_base() -> CgroupBase:
    with open("/proc/self/mountinfo") as mountinfo, open("/proc/self/cgroup") as own:
        base = cgroup2_base(mountinfo.read(), own.read())
    if base is None:
        raise OSError(errno.ENOENT, "cgroup v2: no cgroup2 file system is mounted")
    with open(os.path.join(base, "cgroup.controllers")) as file:
        missing = sorted(set(CONTROLLERS) - set(file.read().split()))
    if missing:
        raise OSError(errno.ENOTSUP, f"cgroup v2: {base} does not offer the {', '.join(missing)} controller(s)")
    control = os.path.join(base, "cgroup.subtree_control")
    with open(control) as file:
        enabled = set(file.read().split())
    if not set(CONTROLLERS) <= enabled:
        try:
            with open(control, "w") as file:
                file.write(" ".join(f"+{name}" for name in CONTROLLERS if name not in enabled))
        except OSError as exc:
            # EBUSY: the cgroup holds processes (ours), so it may not hand domain controllers to children.
            raise OSError(exc.errno, f"cgroup v2: cannot enable {', '.join(CONTROLLERS)} for children of {base}: "
                                     f"{os.strerror(exc.errno or 0)}; start the trainer in a delegated cgroup "
                                     "subtree to get per-run cgroups") from exc
    return CgroupBase(version=2, directories={"": base})


@contextlib.contextmanager
def run_cgroup(base: CgroupBase, limits: CgroupLimits):  # type: ignore[no-untyped-def]
    """Fresh cgroup(s) under ``base`` with ``limits``; yields the :class:`RunCgroup`; removed afterwards (the
    caller guarantees every process of the run is gone by then)."""
    name = f"cipo-sandbox-{os.getpid()}-{secrets.token_hex(6)}"
    made: dict[str, str] = {}
    try:
        for controller, parent in base.directories.items():
            made[controller] = os.path.join(parent, name)
            os.mkdir(made[controller])
        files = {"": limits.files()} if base.version == 2 else limits.v1_files()
        for controller, values in files.items():
            for file_name, value in values.items():
                _write_limit(os.path.join(made[controller], file_name), value, optional=base.version == 1
                             and file_name == "memory.memsw.limit_in_bytes")
        yield RunCgroup(version=base.version, directories=made)
    finally:
        for path in made.values():
            if os.path.isdir(path):
                _remove(path)


def _write_limit(path: str, value: str, *, optional: bool) -> None:
    """Write one interface file; an optional one that the kernel does not offer (v1 swap accounting off) is
    skipped."""
    if optional and not os.path.exists(path):
        return
    with open(path, "w") as file:
        file.write(value)


def oom_killed(cgroup: RunCgroup) -> bool:
    """Whether the kernel's OOM killer ended processes of this run (its memory limit was reached): v2
    ``memory.events``, v1 the ``oom_kill`` count of ``memory.oom_control``."""
    if cgroup.version == 2:
        counts = _key_values(os.path.join(cgroup.directories[""], "memory.events"))
        return int(counts.get("oom_kill", 0)) + int(counts.get("oom_group_kill", 0)) > 0
    counts = _key_values(os.path.join(cgroup.directories["memory"], "memory.oom_control"))
    return int(counts.get("oom_kill", 0)) > 0


def _key_values(path: str) -> dict[str, str]:
    """A flat-keyed interface file; empty where the kernel does not offer it (v1 before Linux 4.13 has no
    ``oom_kill`` count: an OOM kill there shows as ``killed``)."""
    try:
        with open(path) as file:
            return dict(line.split()[:2] for line in file if line.strip())
    except FileNotFoundError:
        return {}


def _remove(path: str) -> None:
    """rmdir, retrying briefly: the last exited process leaves the cgroup a moment after it was reaped."""
    for _ in range(_RMDIR_ATTEMPTS):
        try:
            os.rmdir(path)
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
        time.sleep(_RMDIR_PAUSE_S)
    logger.warning("cipo sandbox: cgroup %s still busy, left behind", path)
