"""Progress inside a training step, so that a long step (about 25 minutes at 70B) is never silent.

On a terminal: one updating line (tqdm), `step 3/100 rollout: 12/16 samples`, redrawn as the stage and its count
change. Not on a terminal (Slurm's log files, pipes): one plain line per stage as it starts and per count as it
advances. At the end of the step, its stage timings on one line.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

TIMING_PREFIX = "timing/"


class StepProgress:
    """Told by the stage timer when a stage starts (`stage`), and by a stage how much work it has (`expect`) and
    has done (`advance`)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream  # None: sys.stdout when writing (so that a replaced stdout is honoured)
        self._label = ""
        self.label_step = 0  # the step begin_step announced last
        self._stage = ""
        self._unit = ""
        self._done = 0
        self._total = 0
        self._bar: tqdm | None = None

    @property
    def out(self) -> TextIO:
        return self._stream or sys.stdout

    def interactive(self) -> bool:
        return bool(getattr(self.out, "isatty", lambda: False)())

    def begin_step(self, step: int, num_steps: int) -> None:
        self._label = f"step {step}/{num_steps}"
        self.label_step = step

    @property
    def current_stage(self) -> str:
        """The stage that started last (what a failure interrupted)."""
        return self._stage or "none"

    def stage(self, name: str) -> None:
        self._close_bar()
        self._stage, self._unit, self._done, self._total = name, "", 0, 0
        if self.interactive():
            self._bar = tqdm(desc=f"{self._label} {name}", total=None, file=self.out, leave=False,
                             dynamic_ncols=True, bar_format="{desc}{postfix}  {elapsed}")
        else:
            self._print(f"{self._label} | {name}")

    def expect(self, total: int, unit: str) -> None:
        """The current stage has `total` units of work (samples, optimizer steps)."""
        self._unit, self._done, self._total = unit, 0, total
        if self._bar is not None:
            self._bar.reset(total=total)
            self._bar.bar_format = "{desc}: {n_fmt}/{total_fmt} " + unit + " {bar:20} {elapsed}"
            self._bar.refresh()

    def advance(self, count: int = 1) -> None:
        self._done += count
        if self._bar is not None:
            self._bar.update(count)
            self._bar.refresh()  # advances are few (one per generate call or optimizer step): draw each
        else:
            self._print(f"{self._label} | {self._stage}: {self._done}/{self._total} {self._unit}")

    def end_step(self, metrics: dict[str, float | None]) -> None:
        """Close the updating line and print the step's stage timings (the `timing/<stage>` metrics)."""
        self._close_bar()
        timings = {key.removeprefix(TIMING_PREFIX): value for key, value in metrics.items()
                   if key.startswith(TIMING_PREFIX) and key != f"{TIMING_PREFIX}step" and value is not None}
        parts = [f"{stage} {seconds:.1f}s" for stage, seconds in timings.items()]
        self._print(f"  {self._label} stages: {', '.join(parts)}")

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _print(self, line: str) -> None:
        print(line, file=self.out, flush=True)
