"""DAPO's dynamic sampling (arXiv 2503.14476, section 3.2) for the base stream: the trainer samples rounds of
`grpo.prompts_per_step` prompt groups until `prompts_per_step` of them carry gradient (a non-zero advantage), up
to `grpo.dynamic_sampling.max_rounds`; `assemble_rounds` then builds the step's base batch from them.

Which groups, in a fixed order (the same seed gives the same batch, and a resumed run redraws the same rounds):
the first `prompts_per_step` groups that carry gradient, round by round and in prompt order within a round. A step
that found fewer trains on those and is topped up to `prompts_per_step` groups with the earliest groups that carry
none (they add nothing to the gradient, and the skip keeps them out of the train pass; they keep the batch's shape
and the correction stream's pool of anchors, e.g. all-wrong prompts). The correction stream is not resampled, and why:
docs/training_options.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cipo_nemo.data.batch import Batch


@dataclass(frozen=True)
class SampledRound:
    """One round: its prompts' items, their verified base rollouts (group i answers items[i]) and the groups that
    carry gradient."""

    items: list[Any]
    batch: Batch
    live_groups: set[int]


@dataclass(frozen=True)
class DynamicSamplingStats:
    rounds: int
    groups_sampled: int
    groups_live: int  # groups with a non-zero advantage found over all rounds
    groups_discarded: int  # sampled but not in the batch (no gradient, or beyond prompts_per_step)
    groups_short: int  # prompts_per_step minus the live groups in the batch: the batch could not be filled
    tokens_discarded: int  # response tokens sampled in groups left out of the batch (generated, never trained)

    def as_dict(self, prefix: str = "dynamic_sampling/") -> dict[str, float]:
        return {f"{prefix}{name}": float(getattr(self, name)) for name in self.__dataclass_fields__}


def live_group_count(rounds: list[SampledRound]) -> int:
    return sum(len(sampled.live_groups) for sampled in rounds)


def assemble_rounds(rounds: list[SampledRound], *, prompts_per_step: int) -> tuple[list[Any], Batch,
                                                                                    DynamicSamplingStats]:
    """The step's items and base batch from its rounds (module docstring for the order), with groups renumbered
    0..prompts_per_step-1 and `item_index` pointing into the returned items."""
    ordered = [(r, g) for r, sampled in enumerate(rounds) for g in range(len(sampled.items))]
    live = [(r, g) for r, g in ordered if g in rounds[r].live_groups]
    dead = [(r, g) for r, g in ordered if g not in rounds[r].live_groups]
    chosen = (live + dead)[:prompts_per_step]
    items, parts = [], []
    for new_group, (r, g) in enumerate(chosen):
        members = [i for i, group in enumerate(rounds[r].batch["group_id"].tolist()) if group == g]
        part = rounds[r].batch.select(members)
        part["group_id"] = torch.full((len(members),), new_group, dtype=torch.long)
        part["item_index"] = [new_group] * len(members)
        items.append(rounds[r].items[g])
        parts.append(part)
    live_in_batch = min(len(live), prompts_per_step)
    batch = Batch.concat(parts)
    sampled_tokens = sum(sampled.batch.num_valid_tokens() for sampled in rounds)
    stats = DynamicSamplingStats(rounds=len(rounds), groups_sampled=len(ordered), groups_live=len(live),
                                 groups_discarded=len(ordered) - len(chosen),
                                 groups_short=prompts_per_step - live_in_batch,
                                 tokens_discarded=sampled_tokens - batch.num_valid_tokens())
    return items, batch, stats
