"""Throughput of the code sandbox next to a bare interpreter start, measured in the same run.

For one trivial program (``pass``) and one small real one (a HumanEval-sized loop), measures

  (a) bare: ``subprocess.run([python, "-I", "-S", "-c", program])``, no isolation at all;
  (b) sandbox: ``run_program(program)`` (namespaces, mounts, uid drop, limits, bounded output);

each one at a time (mean latency per program) and through ``--workers`` threads (programs per second; the
sandbox through ``SandboxPool.run_many``), and prints them side by side with the per-program overhead of the
sandbox, (b) - (a). ``python`` is the interpreter the sandbox runs programs with (the real path of
``sys.executable``). Every sandboxed result must be ``ok``, else the script exits 1.

Usage: python benchmarks/sandbox_throughput.py [--programs 200] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cipo_nemo.environments.sandbox import SandboxPool, SandboxRequest, run_program  # noqa: E402

PROGRAMS = {
    "pass": "pass\n",
    "small loop": "total = 0\nfor i in range(200_000):\n    total += i * i % 7\nprint(total)\n",
}


def bare_run(python: str, source: str) -> None:
    subprocess.run([python, "-I", "-S", "-c", source], check=True, stdout=subprocess.DEVNULL)


def sandbox_run(source: str) -> None:
    result = run_program(source)
    if result.status != "ok":
        sys.exit(f"sandboxed run failed: {result}")


def mean_latency_s(function, count: int) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    for _ in range(count):
        function()
    return (time.perf_counter() - started) / count


def bare_throughput(python: str, source: str, count: int, workers: int) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as executor:
        list(executor.map(lambda _: bare_run(python, source), range(count)))
    return count / (time.perf_counter() - started)


def sandbox_throughput(source: str, count: int, workers: int) -> float:
    started = time.perf_counter()
    with SandboxPool(workers) as pool:
        results = pool.run_many([SandboxRequest(source=source)] * count)
    elapsed = time.perf_counter() - started
    failed = [result for result in results if result.status != "ok"]
    if failed:
        sys.exit(f"{len(failed)} sandboxed runs failed, first: {failed[0]}")
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--programs", type=int, default=200, help="programs per measurement")
    parser.add_argument("--workers", type=int, default=2, help="concurrent programs for the throughput rows")
    args = parser.parse_args()
    python = os.path.realpath(sys.executable)
    sequential = max(10, args.programs // 4)
    print(f"interpreter {python}; {os.cpu_count()} CPUs; uid {os.geteuid()}; "
          f"{args.programs} programs per throughput row, {sequential} per latency row, {args.workers} workers")
    print(f"{'program':<12} {'bare ms/prog':>13} {'sandbox ms/prog':>16} {'overhead ms':>12} "
          f"{'bare prog/s':>12} {'sandbox prog/s':>15}")
    for name, source in PROGRAMS.items():
        bare_run(python, source)  # warm the page cache
        sandbox_run(source)
        bare_latency = mean_latency_s(lambda: bare_run(python, source), sequential)
        sandbox_latency = mean_latency_s(lambda: sandbox_run(source), sequential)
        bare_rate = bare_throughput(python, source, args.programs, args.workers)
        sandbox_rate = sandbox_throughput(source, args.programs, args.workers)
        print(f"{name:<12} {bare_latency * 1e3:>13.1f} {sandbox_latency * 1e3:>16.1f} "
              f"{(sandbox_latency - bare_latency) * 1e3:>12.1f} {bare_rate:>12.1f} {sandbox_rate:>15.1f}")


if __name__ == "__main__":
    main()
