"""Throughput of the code sandbox next to a bare interpreter start, and next to an earlier sandbox, in one run.

For one trivial program (``pass``) and one small real one (a HumanEval-sized loop), measures

  (a) bare: ``subprocess.run([python, "-I", "-S", "-c", program])``, no isolation at all;
  (b) sandbox: ``run_program(program)`` of this checkout (namespaces, file system view, uid drop, limits);
  (c) with ``--baseline REV``: the same with the sandbox as of git revision REV (exported with ``git archive``
      into a temporary directory), so that a change to the sandbox is measured against what it replaces;

each one at a time (mean latency per program) and through ``--workers`` threads (programs per second; the
sandbox through ``SandboxPool.run_many``). The sandboxes are measured in child processes of this script, the
current and the baseline one alternating for ``--rounds`` rounds so that both see the same machine load; the
table shows the mean over rounds and the ratio current / baseline. ``python`` is the interpreter the sandbox
runs programs with (the real path of ``sys.executable``). Every sandboxed result must be ``ok``, else exit 1.

Usage: python benchmarks/speed/sandbox_throughput.py [--programs 200] [--workers 2] [--baseline REV] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[2]
PROGRAMS = {
    "pass": "pass\n",
    "small loop": "total = 0\nfor i in range(200_000):\n    total += i * i % 7\nprint(total)\n",
}


def mean_latency_s(function: Callable[[], None], count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        function()
    return (time.perf_counter() - started) / count


def bare_run(python: str, source: str) -> None:
    subprocess.run([python, "-I", "-S", "-c", source], check=True, stdout=subprocess.DEVNULL)


def bare_row(python: str, source: str, count: int, sequential: int, workers: int) -> tuple[float, float]:
    """(ms per program one at a time, programs per second through ``workers`` threads) without a sandbox."""
    bare_run(python, source)  # warm the page cache
    latency = mean_latency_s(lambda: bare_run(python, source), sequential)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as executor:
        list(executor.map(lambda _: bare_run(python, source), range(count)))
    return latency * 1e3, count / (time.perf_counter() - started)


def sandbox_rows(count: int, sequential: int, workers: int) -> dict[str, tuple[float, float]]:
    """The sandbox's rows, measured with whatever ``cipo_nemo`` is first on ``sys.path`` (child mode)."""
    from cipo_nemo.environments.sandbox import SandboxPool, SandboxRequest, run_program

    def one(source: str) -> None:
        result = run_program(source)
        if result.status != "ok":
            sys.exit(f"sandboxed run failed: {result}")

    rows = {}
    for name, source in PROGRAMS.items():
        one(source)  # warm up: page cache, the interpreter probe, the compiled launcher
        latency = mean_latency_s(lambda: one(source), sequential)  # noqa: B023
        started = time.perf_counter()
        with SandboxPool(workers) as pool:
            results = pool.run_many([SandboxRequest(source=source)] * count)
        elapsed = time.perf_counter() - started
        failed = [result for result in results if result.status != "ok"]
        if failed:
            sys.exit(f"{len(failed)} sandboxed runs failed, first: {failed[0]}")
        rows[name] = (latency * 1e3, count / elapsed)
    return rows


def measure_tree(tree: Path, args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """Run this script in child mode with ``tree``'s ``cipo_nemo`` first on the path."""
    command = [sys.executable, __file__, "--child", str(tree), "--programs", str(args.programs),
               "--workers", str(args.workers)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False, cwd=tree,
                               env={**os.environ, "PYTHONPATH": str(tree)})
    if completed.returncode != 0:
        sys.exit(f"measuring {tree} failed:\n{completed.stderr}")
    return {name: tuple(row) for name, row in json.loads(completed.stdout.splitlines()[-1]).items()}


def export_revision(revision: str, directory: str) -> Path:
    archive = subprocess.run(["git", "-C", str(PROJECT_DIR), "archive", revision, "cipo_nemo"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", directory], input=archive, check=True)
    return Path(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--programs", type=int, default=200, help="programs per throughput row")
    parser.add_argument("--workers", type=int, default=2, help="concurrent programs for the throughput rows")
    parser.add_argument("--baseline", help="git revision whose sandbox to measure next to this checkout's")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of current and baseline")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sequential = max(10, args.programs // 4)
    if args.child:
        sys.path.insert(0, args.child)
        print(json.dumps(sandbox_rows(args.programs, sequential, args.workers)))
        return
    python = os.path.realpath(sys.executable)
    print(f"interpreter {python}; {os.cpu_count()} CPUs; uid {os.geteuid()}; {args.programs} programs per "
          f"throughput row, {sequential} per latency row, {args.workers} workers, {args.rounds} round(s); "
          f"baseline {args.baseline or 'none'}")
    with tempfile.TemporaryDirectory(prefix="cipo_sandbox_baseline_") as directory:
        trees = {"current": PROJECT_DIR}
        if args.baseline:
            trees["baseline"] = export_revision(args.baseline, directory)
        measured: dict[str, list[dict[str, tuple[float, float]]]] = {label: [] for label in trees}
        bare: list[dict[str, tuple[float, float]]] = []
        for _ in range(args.rounds):
            bare.append({name: bare_row(python, source, args.programs, sequential, args.workers)
                         for name, source in PROGRAMS.items()})
            for label, tree in trees.items():
                measured[label].append(measure_tree(tree, args))
    print_table(bare, measured)


def print_table(bare: list[dict[str, tuple[float, float]]],
                measured: dict[str, list[dict[str, tuple[float, float]]]]) -> None:
    def mean(rounds: list[dict[str, tuple[float, float]]], name: str, column: int) -> float:
        return statistics.fmean(row[name][column] for row in rounds)

    labels = list(measured)
    header = f"{'program':<12} {'bare ms':>8} " + " ".join(f"{label + ' ms':>12}" for label in labels)
    header += f" {'bare prog/s':>12} " + " ".join(f"{label + ' prog/s':>16}" for label in labels)
    if "baseline" in measured:
        header += f" {'prog/s current/baseline':>24}"
    print(header)
    for name in PROGRAMS:
        line = f"{name:<12} {mean(bare, name, 0):>8.1f} "
        line += " ".join(f"{mean(measured[label], name, 0):>12.1f}" for label in labels)
        line += f" {mean(bare, name, 1):>12.1f} "
        line += " ".join(f"{mean(measured[label], name, 1):>16.1f}" for label in labels)
        if "baseline" in measured:
            line += f" {mean(measured['current'], name, 1) / mean(measured['baseline'], name, 1):>24.3f}"
        print(line)


if __name__ == "__main__":
    main()
