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

from cipo_nemo.config import MasterConfig
from cipo_nemo.utils.checkpoint import CheckpointManager

RESTARTS_FILE = "worker_restarts.jsonl"
# Exit status when a worker died once more than cluster.max_restarts allows: not requeued (EX_SOFTWARE of sysexits.h).
RESTARTS_EXHAUSTED_EXIT_CODE = 70


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


def after_worker_death(cfg: MasterConfig, worker: str, *, requeue_exit_code: int,
                       what: str = "worker died") -> tuple[str, int]:
    """The driver's last line and exit code after `worker` (WorkerDiedError.summary()) died mid-run, or, with `what`
    "generation stalled", after the trainer gave up waiting for the generator: requeue to resume from the last
    complete checkpoint, until the run directory has seen more than cluster.max_restarts of either."""
    run_dir = Path(cfg.run.output_dir)
    checkpoint = CheckpointManager(run_dir / "checkpoints", keep_last=cfg.checkpointing.keep_last).latest()
    decision = record_worker_death(run_dir, worker=worker, checkpoint=checkpoint, max_restarts=cfg.cluster.max_restarts)
    resume_from = f"last complete checkpoint {checkpoint}" if checkpoint else "no complete checkpoint yet (step 0)"
    if decision.restart:
        code, then = requeue_exit_code, "rerun the same command to resume"
    else:
        code, then = RESTARTS_EXHAUSTED_EXIT_CODE, "giving up"
    line = f"{what}: {worker}; {resume_from}; {decision.describe()}; exit code {code}: {then}"
    return " ".join(line.split()), code  # one line, whatever the remote message held
