"""One scorer for both task families: math through the math verifier pool, code through the sandbox; or, when
`verifier.custom` names a user function, that function for every item (cipo_nemo/environments/custom_reward.py).

Both streams of a CIPO step (base rollouts and corrections) are scored here against the *original* item's
ground truth. A code item's `answer` holds its tests in the code-task JSONL format (cipo_nemo/environments/code.py):
`{"entry_point", "test"}` (+ optional `"prompt"`: a code prefix run before the program) for HumanEval style, or
`{"tests": [{"input", "output"}]}` for stdin/stdout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cipo_nemo.config.schema import VerifierConfig
from cipo_nemo.data.sources import TaskItem
from cipo_nemo.environments.code import CodeTask, code_task_from_record, score_code_batch
from cipo_nemo.environments.custom_reward import CustomRewardPool
from cipo_nemo.environments.math_pool import MathVerifierPool


@dataclass(frozen=True)
class Scores:
    rewards: list[float]
    reasons: list[str]  # math: correct/wrong/no_answer/timeout/error; code: passed/failed/timeout/...; custom: its own


def code_task_of(item: TaskItem) -> CodeTask:
    if not isinstance(item.answer, dict):
        raise ValueError(f"{item.origin}: a code item's answer must be an object with its tests")
    # The item's prompt is what the model reads (often prose); only a code prefix given in the answer
    # (HumanEval's "prompt") is executed with the program.
    return code_task_from_record({"task_id": item.id, **item.answer}, where=item.origin)


class TaskScorer:
    """Scores (item, response) pairs; keeps one math worker pool alive for the whole run."""

    def __init__(self, *, verifier: VerifierConfig) -> None:
        self._verifier = verifier
        self._math: MathVerifierPool | None = None
        self._custom: CustomRewardPool | None = None
        if verifier.custom is not None:
            self._custom = CustomRewardPool(verifier.custom, num_workers=verifier.num_workers,
                                            timeout_s=verifier.timeout_s, batch_size=verifier.custom_batch_size)
        else:
            self._math = MathVerifierPool(num_workers=verifier.num_workers, timeout_s=verifier.timeout_s)

    def score(self, items: Sequence[TaskItem], responses: Sequence[str]) -> Scores:
        if len(items) != len(responses):
            raise ValueError(f"got {len(responses)} responses for {len(items)} items")
        if self._custom is not None:
            return Scores(*self._custom.score(items, responses))
        assert self._math is not None
        rewards = [0.0] * len(items)
        reasons = [""] * len(items)
        math_positions = [i for i, item in enumerate(items) if item.family == "math"]
        code_positions = [i for i, item in enumerate(items) if item.family == "code"]
        if math_positions:
            verdicts = self._math.score([responses[i] for i in math_positions], [items[i].answer for i in math_positions])
            for position, verdict in zip(math_positions, verdicts):
                rewards[position], reasons[position] = verdict.reward, verdict.reason
        if code_positions:
            verdicts = score_code_batch(
                [responses[i] for i in code_positions],
                [code_task_of(items[i]) for i in code_positions],
                num_workers=self._verifier.num_workers,
                timeout_s=self._verifier.timeout_s,
            )
            for position, verdict in zip(code_positions, verdicts):
                rewards[position], reasons[position] = verdict.reward, verdict.outcome
        return Scores(rewards=rewards, reasons=reasons)

    def close(self) -> None:
        for pool in (self._math, self._custom):
            if pool is not None:
                pool.close()
