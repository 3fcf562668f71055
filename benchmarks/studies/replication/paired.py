"""Paired per-problem comparisons of two evaluations on the same problems, with bootstrap intervals.

Both models answered the same problems n times each (the harness's `results.json`, `problems[*].rewards`). A
per-problem statistic (avg@n: the share of right samples; pass@k: the unbiased estimator of the harness) is
computed for each model, the difference taken per problem, and its mean reported with a percentile bootstrap
95% interval over problems (resampling problems, not samples: the problems are the unit the claim is about).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cipo_nemo.eval.passk import pass_at_k
from cipo_nemo.eval.report import num_correct

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 20261205  # fixed: a re-rendered report shows the same intervals


@dataclass(frozen=True)
class PairedDifference:
    """mean(B - A) over the shared problems, with its bootstrap 95% interval."""

    statistic: str
    problems: int
    mean_a: float
    mean_b: float
    difference: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        """'B higher' / 'A higher' when the interval excludes 0, else 'no difference shown'."""
        if self.low > 0:
            return "B higher"
        if self.high < 0:
            return "A higher"
        return "no difference shown"

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "verdict": self.verdict}


def per_problem(problems: Sequence[Mapping[str, Any]], statistic: str) -> dict[str, float]:
    """Problem id -> 'avg' (share of right samples) or 'pass@k' (unbiased, n samples, c right)."""
    compute = _statistic(statistic)
    return {problem["id"]: compute(problem["rewards"]) for problem in problems}


def paired_difference(a: Mapping[str, float], b: Mapping[str, float], *, statistic: str,
                      resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> PairedDifference:
    """mean(b - a) over the problems both have; percentile bootstrap 95% interval over problems."""
    shared = sorted(set(a) & set(b))
    if not shared:
        raise ValueError(f"{statistic}: the two evaluations share no problem")
    values_a = np.array([a[key] for key in shared])
    values_b = np.array([b[key] for key in shared])
    differences = values_b - values_a
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, len(shared), size=(resamples, len(shared)))
    means = differences[indices].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return PairedDifference(statistic=statistic, problems=len(shared), mean_a=float(values_a.mean()),
                            mean_b=float(values_b.mean()), difference=float(differences.mean()), low=float(low),
                            high=float(high))


def _statistic(name: str) -> Callable[[Sequence[float]], float]:
    if name == "avg":
        return lambda rewards: num_correct(rewards) / len(rewards)
    if name.startswith("pass@") and name[5:].isdigit():
        k = int(name[5:])
        return lambda rewards: pass_at_k(len(rewards), num_correct(rewards), k)
    raise ValueError(f"unknown statistic {name!r}: expected 'avg' or 'pass@<k>'")
