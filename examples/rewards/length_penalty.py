"""A worked example of a user reward function (`verifier.custom`): math correctness with a length penalty.

    PYTHONPATH=examples/rewards python -m cipo_nemo --config conf/cipo_smollm2_cpu.yaml \
        verifier.custom=length_penalty:reward

The contract: called with a batch (a list of TaskItem and the list of responses, same length), return one
(reward, reason) pair per row. Here:

    reward = correct - PENALTY_PER_CHAR * max(0, len(response) - FREE_CHARS), floored at 0 for a correct answer

so a correct answer stays above 0.5 (a success for anchors and pass rates) only while it is not far too long, and a
wrong one stays at 0. Reasons are counted per step (`verifier/<reason>` in metrics.jsonl): keep them few.

The function runs in the verifier's worker processes, verifier.custom_batch_size rows per call, each call within
verifier.timeout_s; a row whose call raises or hangs gets reward 0 and reason custom_error / custom_timeout. It may
use anything importable: here, cipo_nemo's own math checker in-process (score_one), which the pool's timeout guards.
"""

from __future__ import annotations

from cipo_nemo.data.sources import TaskItem
from cipo_nemo.environments.math import score_one

FREE_CHARS = 1200  # responses up to this long are not penalized
PENALTY_PER_CHAR = 1 / 2000  # reward lost per character beyond FREE_CHARS: a correct answer 1000 chars over keeps 0.5


def reward(items: list[TaskItem], responses: list[str]) -> list[tuple[float, str]]:
    return [_one(item, response) for item, response in zip(items, responses)]


def _one(item: TaskItem, response: str) -> tuple[float, str]:
    if item.family != "math":
        raise ValueError(f"length_penalty scores math items only, got a {item.family} item ({item.origin})")
    verdict = score_one(response, item.answer)
    if verdict.reason != "correct":
        return 0.0, verdict.reason  # wrong / no_answer / error, as the built-in verifier says
    excess = max(0, len(response) - FREE_CHARS)
    if excess == 0:
        return 1.0, "correct"
    return max(0.0, 1.0 - PENALTY_PER_CHAR * excess), "correct_too_long"
