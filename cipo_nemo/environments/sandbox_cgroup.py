"""A cgroup v2 per sandboxed run: limits that add up across many programs, where the machine allows it.

rlimits are per process: a run may hold ``memory_mb`` in each of its ``max_processes`` processes, its tmpfs
pages are counted nowhere, and every process may use a whole core. A cgroup bounds the run as a whole:

- ``memory.max``: every page of the run, tmpfs pages (the working directory, ``/dev/shm``) included, since
  the kernel charges a shared-memory page to the cgroup of the process that first touches it;
  ``memory.swap.max`` 0 and ``memory.oom.group`` 1 (an OOM ends the whole run, reported as ``memory``);
- ``pids.max``: processes and threads of the run, the launcher and the namespace init included;
- ``cpu.max``: a CPU quota (``cpu_cores`` cores per 100 ms period), so a run of busy threads cannot take
  more than its share from the trainer.

Usable when a cgroup v2 hierarchy is mounted, and the cgroup this process lives in offers the ``memory``,
``pids`` and ``cpu`` controllers and can delegate them to children (a cgroup that holds processes itself
cannot, except the root). Otherwise :func:`sandbox_cgroup_base` logs one warning, naming the reason, and the
sandbox keeps to rlimits alone.
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
        quota_us = max(1000, round(self.cpu_cores * CPU_PERIOD_US))  # the kernel's smallest quota is 1 ms
        return {
            "memory.max": str(self.memory_bytes),
            "memory.swap.max": "0",
            "memory.oom.group": "1",
            "pids.max": str(self.pids),
            "cpu.max": f"{quota_us} {CPU_PERIOD_US}",
        }


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


@functools.cache
def sandbox_cgroup_base() -> str | None:
    """The directory under which each run gets its cgroup, or None (warned once) when cgroups are unusable."""
    try:
        base = _delegating_base()
    except OSError as exc:
        logger.warning("cipo sandbox: cgroup v2 limits unavailable (%s); memory, processes and CPU are "
                       "limited per process by rlimits only", exc)
        return None
    return base


def _delegating_base() -> str:
    with open("/proc/self/mountinfo") as mountinfo, open("/proc/self/cgroup") as own:
        base = cgroup2_base(mountinfo.read(), own.read())
    if base is None:
        raise OSError(errno.ENOENT, "no cgroup v2 file system is mounted")
    with open(os.path.join(base, "cgroup.controllers")) as file:
        missing = sorted(set(CONTROLLERS) - set(file.read().split()))
    if missing:
        raise OSError(errno.ENOTSUP, f"cgroup {base} does not offer the {', '.join(missing)} controller(s)")
    control = os.path.join(base, "cgroup.subtree_control")
    with open(control) as file:
        enabled = set(file.read().split())
    if not set(CONTROLLERS) <= enabled:
        try:
            with open(control, "w") as file:
                file.write(" ".join(f"+{name}" for name in CONTROLLERS if name not in enabled))
        except OSError as exc:
            # EBUSY: the cgroup holds processes (ours), so it may not hand domain controllers to children.
            raise OSError(exc.errno, f"cannot enable {', '.join(CONTROLLERS)} for children of {base}: "
                                     f"{os.strerror(exc.errno or 0)}; start the trainer in a delegated cgroup "
                                     "subtree to get per-run cgroups") from exc
    return base


@contextlib.contextmanager
def run_cgroup(base: str, limits: CgroupLimits):  # type: ignore[no-untyped-def]
    """A fresh cgroup under ``base`` with ``limits``; yields its ``cgroup.procs`` path; removed afterwards
    (the caller guarantees every process of the run is gone by then)."""
    path = os.path.join(base, f"cipo-sandbox-{os.getpid()}-{secrets.token_hex(6)}")
    os.mkdir(path)
    try:
        for name, value in limits.files().items():
            with open(os.path.join(path, name), "w") as file:
                file.write(value)
        yield path
    finally:
        _remove(path)


def oom_killed(cgroup: str) -> bool:
    """Whether the kernel's OOM killer ended processes of this cgroup (its memory limit was reached)."""
    with open(os.path.join(cgroup, "memory.events")) as file:
        counts = dict(line.split() for line in file if line.strip())
    return int(counts.get("oom_kill", 0)) + int(counts.get("oom_group_kill", 0)) > 0


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
