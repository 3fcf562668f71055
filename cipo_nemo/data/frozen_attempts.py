"""Frozen start-model attempts for the correction stream (`cipo.anchor_source: frozen_start`).

With `anchor_source: policy` (the recipe's default) a correction prompt quotes the anchor itself: the policy's own
base sample from this step. `frozen_start` keeps everything about the anchors (which prompts, how many, which are
right and which wrong: the difficulty window and rho act on the policy's rollouts as always) and changes only the
quoted text: an attempt the *start* model made at the same problem, with the same verdict as the anchor (a wrong
one for a failed anchor, a right one for a successful anchor), read from `cipo.frozen_attempts`. The correction
stream then trains on the template with attempts that never move with the policy, which separates "learning from
its own current failures" from "practising the correction template" (benchmarks/studies/study_corrections.py).

The file is JSON Lines, one object per training item, as the evaluation harness's samples.jsonl writes them
(`python -m cipo_nemo.eval --output-dir` on the training items; other fields are ignored):

    {"id": "<the training item's id>", "responses": ["<attempt>", ...], "rewards": [<verifier reward>, ...]}

An anchor whose problem has no start-model attempt of its verdict quotes nothing: the trainer drops it, as it drops
one whose prompt is too long (counted in `cipo/anchors_dropped_too_long`).
"""

from __future__ import annotations

import functools
import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cipo_nemo.config.schema import CorrectionConfig
from cipo_nemo.data.sources import DataError

logger = logging.getLogger(__name__)

KEY = "cipo.frozen_attempts"


@dataclass(frozen=True)
class FrozenAttempts:
    """Per training item id, the start model's right and wrong attempts (each in the file's order)."""

    path: str
    right: dict[str, tuple[str, ...]]
    wrong: dict[str, tuple[str, ...]]

    @property
    def item_ids(self) -> set[str]:
        return set(self.right) | set(self.wrong)

    def quote(self, item_ids: Sequence[str], anchor_correct: Sequence[bool], *, seed: int) -> list[str | None]:
        """For anchor i (its problem `item_ids[i]`, its verdict `anchor_correct[i]`), one start-model attempt with
        that verdict, drawn uniformly by a generator seeded from `seed` and i (the same draw on a resumed run);
        None where the start model made no such attempt."""
        if len(item_ids) != len(anchor_correct):
            raise ValueError(f"{len(item_ids)} anchors but {len(anchor_correct)} verdicts")
        quoted: list[str | None] = []
        for position, (item_id, correct) in enumerate(zip(item_ids, anchor_correct)):
            candidates = (self.right if correct else self.wrong).get(item_id, ())
            draw = random.Random(seed * 1_000_003 + position)
            quoted.append(candidates[draw.randrange(len(candidates))] if candidates else None)
        return quoted


@functools.lru_cache(maxsize=4)
def load_frozen_attempts(path: str, *, is_success: Callable[[torch.Tensor], torch.Tensor]) -> FrozenAttempts:
    """The file at `path` (see the module docstring); an attempt is right where `is_success` says so of its reward
    (the trainer's rule, algorithms/rewards.py). Read once per process: a run's file does not change under it.
    A missing file, a malformed line or an id given twice is a DataError naming the file and line."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"{KEY}: {file} is not a file (make it with the start model's attempts at the training items)")
    right: dict[str, tuple[str, ...]] = {}
    wrong: dict[str, tuple[str, ...]] = {}
    with file.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            item_id, responses, rewards = _parse_row(line, location=f"{KEY}: {file}:{number}")
            if item_id in right:
                raise DataError(f"{KEY}: {file}:{number}: item id {item_id!r} given twice")
            verdicts = is_success(torch.tensor(rewards, dtype=torch.float32)).tolist()
            right[item_id] = tuple(text for text, good in zip(responses, verdicts) if good)
            wrong[item_id] = tuple(text for text, good in zip(responses, verdicts) if not good)
    if not right:
        raise DataError(f"{KEY}: {file} holds no attempt")
    return FrozenAttempts(path=str(file), right=right, wrong=wrong)


def _parse_row(line: str, *, location: str) -> tuple[str, list[str], list[float]]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{location}: not JSON ({error.msg})") from None
    if not isinstance(row, dict):
        raise DataError(f"{location}: expected a JSON object with id, responses and rewards")
    item_id, responses, rewards = row.get("id"), row.get("responses"), row.get("rewards")
    if not isinstance(item_id, str) or not item_id:
        raise DataError(f"{location}: 'id' must be a non-empty string")
    if not isinstance(responses, list) or not all(isinstance(text, str) for text in responses):
        raise DataError(f"{location}: 'responses' must be a list of strings")
    if (not isinstance(rewards, list) or len(rewards) != len(responses)
            or not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in rewards)):
        raise DataError(f"{location}: 'rewards' must be a list of numbers, one per response")
    return item_id, responses, [float(r) for r in rewards]


def anchor_attempts(correction: CorrectionConfig, *, own: Sequence[str], item_ids: Sequence[str],
                    anchor_correct: Sequence[bool], is_success: Callable[[torch.Tensor], torch.Tensor],
                    seed: int) -> list[str | None]:
    """The attempt each anchor's correction prompt quotes (`cipo.anchor_source`): with policy the anchor itself
    (`own`, the policy's base sample); with frozen_start a start-model attempt at the same problem with the
    anchor's verdict, None where there is none (the trainer then drops the anchor)."""
    if correction.anchor_source == "policy":
        return list(own)
    quoted = load_frozen_attempts(correction.frozen_attempts, is_success=is_success).quote(
        item_ids, anchor_correct, seed=seed)
    if None in quoted:
        logger.info("%d of %d anchors have no start-model attempt of their verdict; dropped", quoted.count(None),
                    len(quoted))
    return quoted


def coverage(attempts: FrozenAttempts, item_ids: Sequence[str]) -> dict[str, int]:
    """How many of the training items have a right, a wrong, and both kinds of start-model attempt."""
    ids = set(item_ids)
    has_right = {i for i in ids if attempts.right.get(i)}
    has_wrong = {i for i in ids if attempts.wrong.get(i)}
    return {"items": len(ids), "in_file": len(ids & attempts.item_ids), "with_right": len(has_right),
            "with_wrong": len(has_wrong), "with_both": len(has_right & has_wrong)}
