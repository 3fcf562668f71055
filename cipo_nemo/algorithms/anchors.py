"""Difficulty-aware anchor selection (docs/design.md step 2, paper section 3.3).

The anchors of a step are the base rollouts that become correction prompts: a share rho of them successful,
preferably from prompts whose accuracy p lies in [cipo.difficulty_low, cipo.difficulty_high].
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cipo_nemo.algorithms.rewards import SUCCESS_THRESHOLD
from cipo_nemo.algorithms.tensor_checks import check_rewards_and_groups

@dataclass(frozen=True)
class AnchorSelection:
    """The anchors of one step.

    `indices` index the base samples; successful anchors come first, then failed ones, each kind in the order
    it was drawn. `anchor_correct[i]` and `in_window[i]` describe `indices[i]`. `prompt_accuracy` maps every
    group id of the base batch to its accuracy p (mean reward).
    """

    indices: list[int]
    anchor_correct: list[bool]
    in_window: list[bool]
    prompt_accuracy: dict[int, float]
    truncated: list[bool] | None = None  # per anchor: its generation hit max_new_tokens (None: not known)

    def __post_init__(self) -> None:
        if not len(self.indices) == len(self.anchor_correct) == len(self.in_window):
            raise ValueError(
                f"AnchorSelection lists differ in length: indices {len(self.indices)}, "
                f"anchor_correct {len(self.anchor_correct)}, in_window {len(self.in_window)}"
            )

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def num_successful(self) -> int:
        return sum(self.anchor_correct)

    @property
    def num_failed(self) -> int:
        return len(self.indices) - self.num_successful

    @property
    def num_truncated(self) -> int:
        return sum(self.truncated or [])

    @property
    def num_in_window(self) -> int:
        return sum(self.in_window)

    @property
    def num_fallback(self) -> int:
        """Anchors taken from prompts outside [difficulty_low, difficulty_high]."""
        return len(self.indices) - self.num_in_window


def select_anchors(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    rho: float,
    max_anchors_per_step: int,
    difficulty_low: float,
    difficulty_high: float,
    allow_out_of_window: bool,
    generator: torch.Generator,
    truncated: Sequence[bool] | None = None,
) -> AnchorSelection:
    """Choose up to `max_anchors_per_step` base rollouts to be corrected, a share `rho` of them successful.

    Counts: n_success = floor(rho * max_anchors_per_step + 0.5) (round half up, not Python's banker's rounding),
    n_failed = max_anchors_per_step - n_success. Each kind is taken *as available*: when there are fewer successful
    (or failed) rollouts than asked, the shortfall is not filled with the other kind, so that rho keeps its
    meaning as the share of successful anchors asked for, and fewer than `max_anchors_per_step` anchors may result.

    Candidates of one kind come in tiers: first rollouts of in-window prompts (difficulty_low <= p <= difficulty_high, p = mean
    reward of the prompt's group), then, only with `allow_out_of_window`, rollouts of the other prompts.
    Within each of those, rollouts whose generation stopped on its own come before `truncated` ones (cut at
    max_new_tokens: often not an attempt at all, so a poor thing to correct or to keep).
    Inside a tier the anchors are spread over prompts: each round visits the prompts that still hold
    candidates in a random order and takes one random rollout from each, until the count is reached.

    Randomness comes only from `generator` (successful anchors are drawn before failed ones), so the result
    is a function of the inputs and the generator's state.
    """
    check_rewards_and_groups(rewards, group_ids)
    if not 0.0 <= rho <= 1.0:  # rho comes from the controller, not the config
        raise ValueError(f"rho must lie in [0, 1], got {rho}")
    reward_list = [float(r) for r in rewards.tolist()]
    group_list = [int(g) for g in group_ids.tolist()]
    accuracy = _prompt_accuracy(reward_list, group_list)
    in_window_prompt = {group: difficulty_low <= p <= difficulty_high for group, p in accuracy.items()}
    cut = [False] * len(reward_list) if truncated is None else [bool(t) for t in truncated]
    if len(cut) != len(reward_list):
        raise ValueError(f"truncated has {len(cut)} entries, rewards {len(reward_list)}")
    num_successful = math.floor(rho * max_anchors_per_step + 0.5)  # n_s = floor(rho * N + 0.5)
    window_tiers = (True, False) if allow_out_of_window else (True,)  # in-window prompts first
    indices: list[int] = []
    for successful, quota in ((True, num_successful), (False, max_anchors_per_step - num_successful)):
        for window_tier, truncated_tier in itertools.product(window_tiers, (False, True)):  # finished ones first
            tier = [
                i
                for i, reward in enumerate(reward_list)
                if (reward > SUCCESS_THRESHOLD) == successful and in_window_prompt[group_list[i]] == window_tier
                and cut[i] == truncated_tier
            ]
            picked = _spread_over_prompts(tier, group_list, quota=quota, generator=generator)
            indices += picked
            quota -= len(picked)  # a shortfall moves to the next tier of the same kind, never to the other kind
    return AnchorSelection(
        indices=indices,
        anchor_correct=[reward_list[i] > SUCCESS_THRESHOLD for i in indices],
        in_window=[in_window_prompt[group_list[i]] for i in indices],
        prompt_accuracy=accuracy,
        truncated=[cut[i] for i in indices],
    )


def _prompt_accuracy(rewards: list[float], group_ids: list[int]) -> dict[int, float]:
    totals: dict[int, list[float]] = {}
    for reward, group in zip(rewards, group_ids):
        totals.setdefault(group, []).append(reward)
    return {group: sum(values) / len(values) for group, values in sorted(totals.items())}  # p = mean r


def _spread_over_prompts(
    candidates: list[int], group_ids: list[int], *, quota: int, generator: torch.Generator
) -> list[int]:
    """Up to `quota` candidates, at most one per prompt per round, prompts visited in a random order."""
    if quota <= 0 or not candidates:
        return []
    by_prompt: dict[int, list[int]] = {}
    for index in candidates:
        by_prompt.setdefault(group_ids[index], []).append(index)
    queues = {group: _shuffled(members, generator) for group, members in sorted(by_prompt.items())}
    taken: list[int] = []
    while queues and len(taken) < quota:
        prompts = sorted(queues)
        for position in torch.randperm(len(prompts), generator=generator).tolist():
            if len(taken) == quota:
                break
            queue = queues[prompts[position]]
            taken.append(queue.pop())
            if not queue:
                del queues[prompts[position]]
    return taken


def _shuffled(items: list[int], generator: torch.Generator) -> list[int]:
    return [items[i] for i in torch.randperm(len(items), generator=generator).tolist()]
