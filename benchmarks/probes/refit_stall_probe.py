"""Which processes use the CPU while a refit sub-stage runs slow in the loop (docs/notes/refit.md: stalls).

Runs our GRPO step (benchmarks/speed/step_speed.py's `grpo_megatron_vllm` side: the same config, overrides and
environment) with the refit profile on, while a thread samples every process's CPU time from /proc every
`--interval` seconds. Afterwards, for every refit sub-stage of every step (their wall-clock spans come from the
profile), it prints the stage's seconds and the processes that used the most CPU during it: a stage that takes
several times its usual time shows who ran beside it.

    flock /tmp/cipo_heavy.lock python benchmarks/probes/refit_stall_probe.py --steps 6
"""

from __future__ import annotations

import argparse
import bisect
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from benchmarks.common.proc_sampler import (  # noqa: E402
    ProcessKey, ProcSample, ProcSampler, command_line, read_threads)
from benchmarks.speed.step_speed import CONFIG, REPO, SIDE_OVERRIDES, common_overrides, side_environment  # noqa: E402
from cipo_nemo.models.refit.profile import PROFILE_ENV  # noqa: E402


class Sampler(ProcSampler):
    """(time, {(pid, start): cpu seconds}) every `interval_s`, and each process's name, from a thread; per thread
    too for the processes whose command line contains one of `thread_patterns` (e.g. a Ray actor's class)."""

    def __init__(self, interval_s: float, thread_patterns: tuple[str, ...] = ()) -> None:
        super().__init__(interval_s)
        self.thread_patterns = thread_patterns
        self._cmdlines: dict[int, str] = {}
        self.times: list[float] = []
        self.cpu: list[dict[tuple[int, int], float]] = []
        self.names: dict[tuple[int, int], str] = {}

    def record(self, now: float, processes: dict[ProcessKey, ProcSample], *, first: bool) -> None:
        self.times.append(now)
        self.cpu.append({key: sample.cpu_s for key, sample in processes.items()})
        for key, sample in processes.items():
            if key not in self.names or sample.name == "python":  # a python child renames itself later
                self.names[key] = f"{sample.name}[{key[0]}] {command_line(key[0])[:40]}".rstrip()
        for pid in {pid for pid, _ in processes}:
            if self._traced(pid):
                for (tid_pid, tid), (name, cpu_s) in read_threads(pid).items():
                    key = (tid_pid, -tid)  # negative: a thread, apart from the processes' (pid, start) keys
                    self.cpu[-1][key] = cpu_s
                    self.names.setdefault(key, f"  thread {name}[{tid}] of {self._cmdlines[pid][:40]}")

    def _traced(self, pid: int) -> bool:
        if not self.thread_patterns:
            return False
        if pid not in self._cmdlines:
            self._cmdlines[pid] = command_line(pid)
        return any(pattern in self._cmdlines[pid] for pattern in self.thread_patterns)

    def timeline(self, name: str, start: float, end: float) -> str:
        """`name`'s CPU seconds in each sample interval within [start, end]."""
        keys = [key for key, known in self.names.items() if known == name]
        first = max(0, bisect.bisect_right(self.times, start) - 1)
        last = min(len(self.times) - 1, bisect.bisect_left(self.times, end))
        steps = [sum(self.cpu[i + 1].get(k, 0.0) - self.cpu[i].get(k, 0.0) for k in keys) for i in range(first, last)]
        return " ".join(f"{cpu:.2f}" for cpu in steps)

    def cpu_between(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds per process between the samples that enclose [start, end]."""
        first = max(0, bisect.bisect_right(self.times, start) - 1)
        last = min(len(self.times) - 1, bisect.bisect_left(self.times, end))
        before, after = self.cpu[first], self.cpu[last]
        used = {self.names[key]: after[key] - before.get(key, 0.0) for key in after}
        return {name: seconds for name, seconds in used.items() if seconds > 0}


def run_loop(args: argparse.Namespace, work: Path) -> Path:
    """Our GRPO side as step_speed.py runs it; returns the refit profile."""
    side = "grpo_megatron_vllm"
    overrides = common_overrides(args, work / side) + SIDE_OVERRIDES[side] + args.overrides
    profile = work / "refit.jsonl"
    env = side_environment(args.threads)
    env[PROFILE_ENV] = str(profile)
    command = [sys.executable, str(REPO / "benchmarks" / "speed" / "ours_run.py"), "--config", str(CONFIG),
               "--threads", str(args.threads), "--out", str(work / "summary.json"), *overrides]
    with open(work / "run.log", "w") as log:
        result = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        raise SystemExit(f"the loop failed (exit {result.returncode}); see {work / 'run.log'}")
    return profile


def report(profile: Path, sampler: Sampler, top: int) -> None:
    records = [json.loads(line) for line in profile.read_text().splitlines()]
    durations: dict[str, list[float]] = {}
    for record in records:
        for stage, (start, end) in record["spans"].items():
            durations.setdefault(f"{record['where']}/{stage}", []).append(end - start)
    medians = {key: statistics.median(values) for key, values in durations.items()}
    for record in sorted(records, key=lambda r: min(start for start, _ in r["spans"].values())):
        for stage, (start, end) in sorted(record["spans"].items(), key=lambda item: item[1][0]):
            key = f"{record['where']}/{stage}"
            seconds = end - start
            slow = " SLOW" if seconds > 2 * medians[key] and seconds > 0.1 else ""
            busiest = sorted(sampler.cpu_between(start, end).items(), key=lambda item: -item[1])[:top]
            who = ", ".join(f"{name} {cpu:.2f}" for name, cpu in busiest)
            print(f"{time.strftime('%H:%M:%S', time.localtime(start))} {key:<40} {seconds:6.3f} s"
                  f" (median {medians[key]:.3f}){slow}  cpu: {who}")


def report_train_windows(profile: Path, summary: Path, sampler: Sampler, top: int) -> None:
    """Who used the CPU during each step's train stage: it ends where the step's refit export starts."""
    exports = [json.loads(line)["spans"]["export"][0] for line in profile.read_text().splitlines()
               if json.loads(line)["where"] == "driver"]
    steps = json.loads(summary.read_text())["steps"]
    for number, (export_start, step) in enumerate(zip(exports, steps), start=1):
        train_s = step["timing/train"]
        busiest = sorted(sampler.cpu_between(export_start - train_s, export_start).items(), key=lambda kv: -kv[1])
        who = ", ".join(f"{name} {cpu:.2f}" for name, cpu in busiest[:top])
        print(f"step {number} train {train_s:5.2f} s  cpu: {who}")
        if len(busiest) > 1:  # when in the train stage the second-busiest process ran: CPU s per sample interval
            print(f"    {busiest[1][0][:60]}: " + sampler.timeline(busiest[1][0], export_start - train_s, export_start))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between /proc samples")
    parser.add_argument("--top", type=int, default=4, help="processes (and threads) listed per stage")
    parser.add_argument("--threads-of", nargs="*", default=["ray::", "default_worker.py"],
                        help="also sample the threads of processes whose command line contains one of these")
    parser.add_argument("overrides", nargs="*", help="config overrides on top of the benchmark's (key=value)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="refit_stall_probe_"))
    with Sampler(args.interval, tuple(args.threads_of)) as sampler:
        profile = run_loop(args, work)
    print(f"run: {work}; {len(sampler.times)} samples")
    for line in (work / "run.log").read_text().splitlines():
        if line.startswith("step "):
            print(line)
    report(profile, sampler, args.top)
    report_train_windows(profile, work / "summary.json", sampler, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
