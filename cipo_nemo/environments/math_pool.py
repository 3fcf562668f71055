"""The math verifier's process pool: math-verify calls with a per-item wall-clock timeout.

Extraction and the fast path (cipo_nemo/environments/math.py) run in the calling process; only the pairs that need
math-verify are sent to the pool's workers (a TimedJobPool, cipo_nemo/environments/timed_pool.py).
:class:`MathVerifierPool` keeps workers alive across batches (a training loop holds one); :func:`score_math_batch`
uses a short-lived one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial

from cipo_nemo.environments.math import MathVerdict, math_verify_equivalent, prepare_pair, verdict_of
from cipo_nemo.environments.timed_pool import TimedJobPool

# The process machinery (one job per worker, deadlines, kill and replace, forkserver) is TimedJobPool's
# (cipo_nemo/environments/timed_pool.py); here a job is one (pred, gold) pair for math-verify. The fork server
# preloads math_verify, so a replacement worker only pays its warm-up (about 0.35 s here, against about 0.7 s for
# a spawned one).

EquivalenceFn = Callable[[str, str], bool]


# One of each kind of work, so that the LaTeX grammar, math-verify's regexes and sympy's lazily imported
# simplification modules are loaded before the worker reports ready (and before any item's deadline starts).
_WARM_UP_PAIRS = (
    ("\\frac{2}{4}", "0.5"),
    ("x^2+2x+1", "(x+1)^2"),
    ("\\sqrt{8}", "2\\sqrt{2}"),
    ("(1,2]", "(1,2]"),
)


def _warm_up() -> None:
    for pred_answer, gold_answer_text in _WARM_UP_PAIRS:
        math_verify_equivalent(pred_answer, gold_answer_text)


def _judge(equivalence_fn: EquivalenceFn, pair: tuple[str, str]) -> str:
    return "correct" if equivalence_fn(*pair) else "wrong"


class MathVerifierPool(TimedJobPool):
    """Batched scoring: extraction and fast path here, math-verify in worker processes with per-item timeouts.

    An item whose math-verify call runs past ``timeout_s`` gets reason "timeout" (reward 0.0); its worker is killed
    and replaced, and the rest of the batch is unaffected. Never raises on any input values (non-str items get
    reason "error"); raises ValueError on mismatched lengths and RuntimeError if workers cannot be started at all.
    Not thread-safe: call :meth:`score` from one thread at a time. ``reason_totals``, ``math_verify_calls``
    (distinct pairs shipped to workers) and ``workers_replaced`` count over the pool's lifetime (for logging).

    ``_equivalence_fn`` replaces :func:`math_verify_equivalent` in the workers (tests only; it must be a picklable
    module-level function).
    """

    def __init__(
        self,
        *,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        _equivalence_fn: EquivalenceFn = math_verify_equivalent,
    ) -> None:
        self.reason_totals: Counter[str] = Counter()
        self.math_verify_calls = 0
        super().__init__(num_workers=num_workers, timeout_s=timeout_s, handler=partial(_judge, _equivalence_fn),
                         warm_up=_warm_up, preload=["math_verify"], name="math verifier",
                         start_hint="is math-verify importable in a fresh process?")

    def __enter__(self) -> MathVerifierPool:
        return self

    def score(self, responses: Sequence[str], golds: Sequence[str]) -> list[MathVerdict]:
        """One verdict per (response, gold), in order."""
        self._check_open()
        if len(responses) != len(golds):
            raise ValueError(f"got {len(responses)} responses but {len(golds)} golds")
        prepared = [prepare_pair(response, gold) for response, gold in zip(responses, golds)]
        # Identical (answer, gold) pairs are common among G samples of one prompt: ask math-verify once.
        job_ids: dict[tuple[str, str], int] = {}
        for item in prepared:
            if item.verdict is None:
                job_ids.setdefault(item.job_key, len(job_ids))
        # a failed job's status ("timeout", "error") is its reason
        job_reasons = [outcome.value if outcome.ok else outcome.status for outcome in self.run_jobs(list(job_ids))]
        self.math_verify_calls += len(job_ids)
        verdicts = [
            item.verdict if item.verdict is not None else verdict_of(job_reasons[job_ids[item.job_key]], item.pred_answer)
            for item in prepared
        ]
        self.reason_totals.update(verdict.reason for verdict in verdicts)
        return verdicts


def score_math_batch(
    responses: Sequence[str], golds: Sequence[str], *, num_workers: int = 2, timeout_s: float = 5.0
) -> tuple[list[float], list[str]]:
    """Rewards and reasons for a batch, using a short-lived :class:`MathVerifierPool`.

    A training loop should keep one pool alive instead: starting workers costs about a second.
    """
    with MathVerifierPool(num_workers=num_workers, timeout_s=timeout_s) as pool:
        verdicts = pool.score(responses, golds)
    return [verdict.reward for verdict in verdicts], [verdict.reason for verdict in verdicts]
