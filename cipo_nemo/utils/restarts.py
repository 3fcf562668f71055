"""How many times a run has been restarted after a worker died, counted across requeues.

Each requeue is a new driver process, so the count lives in the run directory (`worker_restarts.jsonl`, one JSON
line per worker death: time, worker, checkpoint resumed from). `cluster.max_restarts` caps it: a worker that dies
again and again (a node that always OOMs, a bad GPU) must not requeue the job forever.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

RESTARTS_FILE = "worker_restarts.jsonl"


@dataclass(frozen=True)
class RestartDecision:
    restart: bool  # True: requeue; False: the budget is spent
    deaths: int  # worker deaths of this run directory so far, this one included
    max_restarts: int

    def describe(self) -> str:
        if self.restart:
            return f"restart {self.deaths} of cluster.max_restarts={self.max_restarts}"
        return (f"not restarting: {self.deaths} worker deaths, cluster.max_restarts={self.max_restarts} "
                f"restarts allowed")


def record_worker_death(run_dir: Path, *, worker: str, checkpoint: Path | None, max_restarts: int) -> RestartDecision:
    """Append this death to the run directory's ledger and decide whether the run may restart once more."""
    path = Path(run_dir) / RESTARTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "worker": worker,
             "checkpoint": None if checkpoint is None else str(checkpoint)}
    with path.open("a") as ledger:  # an append is one write: a driver killed mid-way leaves whole lines behind
        ledger.write(json.dumps(entry) + "\n")
    deaths = worker_deaths(run_dir)
    return RestartDecision(restart=deaths <= max_restarts, deaths=deaths, max_restarts=max_restarts)


def worker_deaths(run_dir: Path) -> int:
    """Worker deaths recorded in `run_dir` (0 when none)."""
    path = Path(run_dir) / RESTARTS_FILE
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.strip())
