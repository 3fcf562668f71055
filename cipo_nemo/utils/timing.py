"""Per-stage wall-clock timers: one `timer.time("<stage>")` per stage, named like the stage function."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class StageTimer:
    """Accumulates seconds per stage within a step; `pop()` returns them as `timing/<stage>` metrics."""

    def __init__(self, on_stage: Callable[[str], None] | None = None) -> None:
        self._seconds: dict[str, float] = defaultdict(float)
        self.on_stage = on_stage  # told each stage's name as it starts (the progress line)

    @contextmanager
    def time(self, stage: str) -> Iterator[None]:
        if self.on_stage is not None:
            self.on_stage(stage)
        start = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[stage] += time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        metrics = {f"timing/{stage}": seconds for stage, seconds in self._seconds.items()}
        metrics["timing/step"] = sum(self._seconds.values())
        self._seconds.clear()
        return metrics


def format_duration(seconds: float) -> str:
    """'1h02m', '3m05s', '42s'."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
