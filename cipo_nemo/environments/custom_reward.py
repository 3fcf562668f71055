"""User reward functions: `verifier.custom: package.module:function`, run in a TimedJobPool with the verifier's timeout.

The function is the user's verifier for every item of the run (both task families, both CIPO streams):

    def reward(items: list[TaskItem], responses: list[str]) -> list[tuple[float, str]]

one (reward, reason) per row, in order. Rewards above 0.5 count as successes (cipo_nemo/algorithms/rewards.py) for
anchors, retention and pass rates; reasons are counted per step (metrics `verifier/<reason>`). The worked example is
examples/rewards/length_penalty.py.

Each call gets up to `verifier.custom_batch_size` rows and `verifier.timeout_s` seconds. A call that raises, runs past
its deadline or returns something else than one (number, str) pair per row is retried one row per call, so that only
the rows that fail are lost: such a row gets reward 0 and reason `custom_error` or `custom_timeout` (counted like any
reason, the first messages logged); the run goes on. Workers import the module by name (spawned processes inherit
the driver's sys.path), so it must be importable from the user's PYTHONPATH; the preflight imports it once first, so
that a wrong name stops the run (exit 2) before any worker starts.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable, Sequence
from functools import cache, partial
from numbers import Real
from typing import Any

from cipo_nemo.data.sources import TaskItem
from cipo_nemo.environments.timed_pool import JobOutcome, TimedJobPool

logger = logging.getLogger(__name__)

CUSTOM_ERROR = "custom_error"
CUSTOM_TIMEOUT = "custom_timeout"
_MESSAGES_LOGGED_PER_BATCH = 3

RewardFunction = Callable[[list[TaskItem], list[str]], Sequence[tuple[float, str]]]


class CustomRewardError(ValueError):
    """`verifier.custom` does not name an importable callable."""


@cache
def load_reward_function(spec: str) -> RewardFunction:
    """'package.module:function' (or 'module:Class.method') -> the callable; CustomRewardError saying what is wrong."""
    module_name, colon, attribute_path = spec.partition(":")
    if not colon or not module_name or not attribute_path:
        raise CustomRewardError(f"{spec!r} is not 'package.module:function'")
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise CustomRewardError(f"cannot import module {module_name!r} ({error}); it must be importable from "
                                "PYTHONPATH, e.g. PYTHONPATH=examples/rewards for examples/rewards/*.py") from None
    except Exception as error:  # the user's module itself fails at import
        raise CustomRewardError(f"importing module {module_name!r} failed: {type(error).__name__}: {error}") from None
    for attribute in attribute_path.split("."):
        if not hasattr(target, attribute):
            raise CustomRewardError(f"module {module_name!r} has no {attribute_path!r}")
        target = getattr(target, attribute)
    if not callable(target):
        raise CustomRewardError(f"{spec!r} is a {type(target).__name__}, not a function")
    return target


def _load_in_worker(spec: str) -> None:
    load_reward_function(spec)  # the import happens before the worker says ready: it never counts against a call


def _checked_rewards(result: object, rows: int) -> list[tuple[float, str]]:
    """The function's result as `rows` (float, str) pairs; TypeError naming what is wrong otherwise."""
    if isinstance(result, (str, bytes)) or not isinstance(result, Sequence) or len(result) != rows:
        got = f"{len(result)} values" if isinstance(result, Sequence) else type(result).__name__
        raise TypeError(f"returned {got} for {rows} rows; return one (reward, reason) pair per row")
    pairs = []
    for row, pair in enumerate(result):
        if not (isinstance(pair, Sequence) and len(pair) == 2):
            raise TypeError(f"row {row}: returned {pair!r}, not a (reward, reason) pair")
        reward, reason = pair
        if isinstance(reward, bool) or not isinstance(reward, Real) or not math.isfinite(reward):
            raise TypeError(f"row {row}: reward {reward!r} is not a finite number")
        if not isinstance(reason, str) or not reason:
            raise TypeError(f"row {row}: reason {reason!r} is not a non-empty str")
        pairs.append((float(reward), reason))
    return pairs


def _call(spec: str, rows: tuple[list[TaskItem], list[str]]) -> list[tuple[float, str]]:
    items, responses = rows
    return _checked_rewards(load_reward_function(spec)(items, responses), len(items))


class CustomRewardPool(TimedJobPool):
    """Scores (item, response) rows with the user's function in worker processes, `batch_size` rows per call."""

    def __init__(self, spec: str, *, num_workers: int, timeout_s: float, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.spec, self.batch_size = spec, batch_size
        super().__init__(num_workers=num_workers, timeout_s=timeout_s, handler=partial(_call, spec),
                         warm_up=partial(_load_in_worker, spec), name="verifier.custom",
                         start_hint=f"can a fresh process import {spec.partition(':')[0]!r} (PYTHONPATH)?")

    def __enter__(self) -> CustomRewardPool:
        return self

    def score(self, items: Sequence[TaskItem], responses: Sequence[str]) -> tuple[list[float], list[str]]:
        """Rewards and reasons, one per row, in order; failed rows get 0 and custom_error / custom_timeout."""
        if len(items) != len(responses):
            raise ValueError(f"got {len(responses)} responses for {len(items)} items")
        rewards, reasons = [0.0] * len(items), [""] * len(items)
        chunks = [list(range(start, min(start + self.batch_size, len(items))))
                  for start in range(0, len(items), self.batch_size)]
        failures = self._score_chunks(chunks, items, responses, rewards, reasons)
        # a failed call of several rows: each of them again, alone, so that one bad row does not sink the others
        retry = [[row] for chunk, _ in failures if len(chunk) > 1 for row in chunk]
        failures = [(chunk, outcome) for chunk, outcome in failures if len(chunk) == 1]
        failures += self._score_chunks(retry, items, responses, rewards, reasons)
        self._log_failures(failures, items)
        return rewards, reasons

    def _score_chunks(self, chunks: list[list[int]], items: Sequence[TaskItem], responses: Sequence[str],
                      rewards: list[float], reasons: list[str]) -> list[tuple[list[int], JobOutcome]]:
        """One call per chunk; writes every row (failed rows: 0 and custom_error / custom_timeout); returns the
        failed chunks with their outcomes."""
        payloads = [([items[row] for row in chunk], [responses[row] for row in chunk]) for chunk in chunks]
        failures = []
        for chunk, outcome in zip(chunks, self.run_jobs(payloads)):
            if outcome.ok:
                for row, (reward, reason) in zip(chunk, outcome.value):
                    rewards[row], reasons[row] = reward, reason
                continue
            failures.append((chunk, outcome))
            for row in chunk:
                rewards[row], reasons[row] = 0.0, CUSTOM_TIMEOUT if outcome.status == "timeout" else CUSTOM_ERROR
        return failures

    def _log_failures(self, failures: list[tuple[list[int], JobOutcome]], items: Sequence[TaskItem]) -> None:
        for chunk, outcome in failures[:_MESSAGES_LOGGED_PER_BATCH]:
            logger.warning("verifier.custom: %s on %s: %s", outcome.status, items[chunk[0]].origin, outcome.message)
        if len(failures) > _MESSAGES_LOGGED_PER_BATCH:
            logger.warning("verifier.custom: %d more failed rows in this batch", len(failures) - _MESSAGES_LOGGED_PER_BATCH)
