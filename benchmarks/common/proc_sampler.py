"""The benchmarks' one /proc sampler: every process's CPU seconds, read when a measured span starts, every
`interval_s` from a thread while it runs, and when it ends.

`speed/cpu_watch.py` (CpuWatch: whose CPU seconds a timed run shared the machine with) and
`probes/refit_stall_probe.py` (which processes ran while a refit stage stalled) subclass `ProcSampler` and keep
what they need of each reading in `record`.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")
ProcessKey = tuple[int, int]  # (pid, start time in ticks): survives pid reuse


@dataclass(frozen=True)
class ProcSample:
    ppid: int
    cpu_s: float  # utime + stime
    name: str


def _parse_stat(raw: str) -> tuple[str, list[str]]:
    """(comm, the fields after it) of a /proc/<pid>/stat or /proc/<pid>/task/<tid>/stat line. comm may contain
    spaces and parentheses: the fields after the last ')' are fixed (proc(5): state is the first of them)."""
    return raw[raw.index("(") + 1 : raw.rindex(")")], raw[raw.rindex(")") + 2 :].split()


def _cpu_seconds(fields: list[str]) -> float:
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def read_processes() -> dict[ProcessKey, ProcSample]:
    """(pid, start time) -> sample, for every process readable now."""
    samples = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:  # the process ended while we listed /proc
            continue
        name, fields = _parse_stat(raw)
        samples[(int(entry.name), int(fields[19]))] = ProcSample(ppid=int(fields[1]), cpu_s=_cpu_seconds(fields),
                                                                  name=name)
    return samples


def read_threads(pid: int) -> dict[tuple[int, int], tuple[str, float]]:
    """(pid, tid) -> (thread name, CPU seconds) for every thread of `pid` readable now."""
    threads = {}
    try:
        tasks = list((PROC / str(pid) / "task").iterdir())
    except OSError:
        return threads
    for task in tasks:
        try:
            name, fields = _parse_stat((task / "stat").read_text())
        except OSError:
            continue
        threads[(pid, int(task.name))] = (name, _cpu_seconds(fields))
    return threads


def command_line(pid: int) -> str:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (/proc/stat: every field but idle and iowait)."""
    fields = [int(v) for v in (PROC / "stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / CLOCK_TICKS  # guest time is already inside user


class ProcSampler:
    """Context manager: `record(now, processes, first=...)` with every process's sample (`read_processes`) when
    entered (first=True), every `interval_s` from a thread while the body runs, and once more when left."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def record(self, now: float, processes: dict[ProcessKey, ProcSample], *, first: bool) -> None:
        raise NotImplementedError

    def __enter__(self) -> ProcSampler:
        self.record(time.time(), read_processes(), first=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()  # no reading runs beside the last one
        self.record(time.time(), read_processes(), first=False)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.record(time.time(), read_processes(), first=False)
