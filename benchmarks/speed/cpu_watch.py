"""Who else used the CPU while a benchmark run was timed.

On this 2-core machine torch's OpenMP threads spin-wait at barriers, so any other busy process slows a run
20-300x (docs/platform.md). `CpuWatch` samples every process in /proc once a second and splits the CPU
seconds used during the run into the benchmark's own process tree (this process and every descendant, even after
it was re-parented) and everything else. /proc/stat's machine-wide busy time is recorded too: processes that
start and end between two samples are seen only there (`machine_busy_s - own_s` bounds "other" from above).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from benchmarks.common.proc_sampler import ProcessKey, ProcSample, ProcSampler, machine_busy_seconds


@dataclass(frozen=True)
class CpuReport:
    wall_s: float
    own_s: float  # the benchmark's process tree
    other_s: float  # every other process seen by the sampler
    machine_busy_s: float  # /proc/stat, all processes
    top_others: list[tuple[str, float]]  # the busiest other processes (name, CPU seconds)

    @property
    def other_share(self) -> float:
        """Other processes' CPU seconds per wall second of the run (0 idle, 1 = one core taken away)."""
        return self.other_s / max(self.wall_s, 1e-9)

    def as_dict(self) -> dict:
        return {"wall_s": self.wall_s, "own_cpu_s": self.own_s, "other_cpu_s": self.other_s,
                "machine_busy_cpu_s": self.machine_busy_s, "other_share": self.other_share,
                "top_others": self.top_others}


class CpuWatch(ProcSampler):
    """Context manager: samples /proc every `interval_s` from a thread while the body runs; `report` afterwards."""

    def __init__(self, interval_s: float = 1.0, root_pid: int | None = None) -> None:
        super().__init__(interval_s)
        self._root = root_pid if root_pid is not None else os.getpid()
        self._first: dict[ProcessKey, float] = {}
        self._last: dict[ProcessKey, ProcSample] = {}
        self._own: set[ProcessKey] = set()
        self.report: CpuReport | None = None

    def __enter__(self) -> CpuWatch:
        self._started = time.monotonic()
        self._busy_start = machine_busy_seconds()
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.report = self._summarize()

    def record(self, now: float, processes: dict[ProcessKey, ProcSample], *, first: bool) -> None:
        by_pid = {key[0]: key for key in processes}
        for key, sample in processes.items():
            if key not in self._first:
                # a process alive at the start counts from there; one started during the run from zero
                self._first[key] = sample.cpu_s if first else 0.0
            self._last[key] = sample
            if key not in self._own and self._descends_from_root(key, processes, by_pid):
                self._own.add(key)

    def _descends_from_root(self, key: tuple[int, int], now: dict, by_pid: dict) -> bool:
        seen = set()
        while key is not None and key not in seen:
            if key[0] == self._root or key in self._own:
                return True
            seen.add(key)
            parent = now[key].ppid
            key = by_pid.get(parent)
        return False

    def _summarize(self) -> CpuReport:
        used = {key: max(0.0, self._last[key].cpu_s - self._first[key]) for key in self._last}
        own = sum(seconds for key, seconds in used.items() if key in self._own)
        others = {key: seconds for key, seconds in used.items() if key not in self._own}
        top = sorted(others.items(), key=lambda kv: -kv[1])[:5]
        return CpuReport(
            wall_s=time.monotonic() - self._started,
            own_s=own,
            other_s=sum(others.values()),
            machine_busy_s=machine_busy_seconds() - self._busy_start,
            top_others=[(f"{self._last[key].name}[{key[0]}]", round(seconds, 2)) for key, seconds in top if seconds > 0],
        )
