"""Where a refit's time goes, per sub-stage, for benchmarks (off unless CIPO_REFIT_PROFILE names a file).

The refit spans three processes (the policy worker writes, the engine's driver checks and calls, each vLLM worker
reloads), so each appends one JSON line `{"where": ..., "<stage>": seconds, ...}` to the file named by the
environment variable, which Ray actors and vLLM's worker processes inherit, with each stage's wall-clock span
(`spans`: first start, last end, in `time.time()` seconds). benchmarks/speed/step_speed.py reads it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

PROFILE_ENV = "CIPO_REFIT_PROFILE"
T = TypeVar("T")
_DONE = object()


class RefitProfile:
    """Seconds per named sub-stage of one refit in one process; `write()` appends them when profiling is on."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.seconds: dict[str, float] = {}
        # wall-clock (first start, last end) per stage: lines up a slow stage with other processes' CPU samples
        self.spans: dict[str, tuple[float, float]] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started, started_at = time.perf_counter(), time.time()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
            self.spans[name] = (self.spans.get(name, (started_at,))[0], time.time())

    def timed_iteration(self, name: str, items: Iterable[T]) -> Iterator[T]:
        """Yield from `items`, adding the time spent producing each item to stage `name` (a generator's work, e.g.
        a gather, apart from what the consumer does with the items)."""
        iterator = iter(items)
        while True:
            with self.stage(name):
                item = next(iterator, _DONE)
            if item is _DONE:
                return
            yield item

    def write(self) -> None:
        path = os.environ.get(PROFILE_ENV)
        if not path:
            return
        line = json.dumps({"where": self.where, "pid": os.getpid(), **self.seconds, "spans": self.spans})
        with open(path, "a") as handle:  # one short append per process per refit: lines do not interleave
            handle.write(line + "\n")
