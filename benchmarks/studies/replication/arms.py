"""One RL arm through the project's real loop (cipo_nemo.trainer: setup -> train -> shutdown).

Two observations are added around the loop, without changing it:
- the prompt ids each step trains on (data_order.json), recorded by wrapping the run's PromptSampler, so that the
  report can show, not just assume, that both arms saw the same data in the same order;
- a step-0 validation (val0.json) with the loop's own `validate`, so that curves start at the shared warm start.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cipo_nemo.loop import part_ends, train
from cipo_nemo.trainer import setup, shutdown, validate
from cipo_nemo.config import MasterConfig
from cipo_nemo.data.sampler import PromptSampler
from cipo_nemo.utils.logger import read_metrics

DATA_ORDER_FILE = "data_order.json"
VAL0_FILE = "val0.json"


class RecordingSampler:
    """A PromptSampler that remembers the ids of every batch it hands out."""

    def __init__(self, inner: PromptSampler) -> None:
        self._inner = inner
        self.batches: list[list[str]] = []

    def next_batch(self):
        batch = self._inner.next_batch()
        self.batches.append([item.id for item in batch])
        return batch

    def __getattr__(self, name: str) -> Any:  # state_dict, load_state_dict, epoch: the real sampler's
        return getattr(self._inner, name)


@dataclass(frozen=True)
class ArmResult:
    run_dir: Path
    records: list[dict[str, Any]]
    val0: dict[str, float | None]
    data_order: list[list[str]]
    seconds: float

    @property
    def hf_model(self) -> Path:
        return self.run_dir / "hf_model"


def run_arm(cfg: MasterConfig) -> ArmResult:
    """Validate the starting policy, train cfg.grpo.num_steps steps, save the final policy; return its records.
    An arm stopped early (a signal, the save deadline) ends the process with one line: it has no final policy.
    One that ends at `checkpointing.stop_after_step` (a part of the arm) returns normally, with no final policy yet.

    A run directory with a checkpoint resumes (the loop's own resume): the step-0 validation is kept from the
    first attempt, and the data order continues from the checkpoint's step (batches of steps after it, which
    the resumed run repeats, are dropped)."""
    started = time.monotonic()
    run_dir = Path(cfg.run.output_dir)
    components = setup(cfg)
    recorder = RecordingSampler(components.sampler)
    if components.start_step and (run_dir / DATA_ORDER_FILE).is_file():
        recorder.batches = json.loads((run_dir / DATA_ORDER_FILE).read_text())[: components.start_step]
    components.sampler = recorder
    try:
        if (run_dir / VAL0_FILE).is_file():
            val0 = json.loads((run_dir / VAL0_FILE).read_text())
        else:
            val0 = validate(components, 0) if cfg.validation.every else {}
            (run_dir / VAL0_FILE).write_text(json.dumps(val0, indent=1))
        summary = train(components)
    finally:
        (run_dir / DATA_ORDER_FILE).write_text(json.dumps(recorder.batches))
        shutdown(components)
    last = cfg.checkpointing.stop_after_step
    part_done = last is not None and summary.stopped_early == part_ends(components, last)
    if summary.stopped_early and not part_done:  # SIGTERM/SIGUSR1 or the save deadline: a checkpoint, no final policy
        raise SystemExit(f"{cfg.run.name}: training stopped early ({summary.stopped_early}) after step "
                         f"{components.start_step + summary.steps_done} of {cfg.grpo.num_steps}; run the same "
                         f"command again to resume from {run_dir / 'checkpoints'}")
    return ArmResult(run_dir=run_dir, records=read_metrics(run_dir), val0=val0, data_order=recorder.batches,
                     seconds=time.monotonic() - started)

