"""DAPO dynamic sampling's batch (algorithms/dynamic_sampling.py): which groups, in which order, and what a short
step trains on."""

from __future__ import annotations

import torch

from cipo_nemo.algorithms.dynamic_sampling import SampledRound, assemble_rounds, live_group_count
from cipo_nemo.data.batch import Batch


def _round(tag: str, live: set[int], prompts: int = 3, samples: int = 2) -> SampledRound:
    items = [f"{tag}{g}" for g in range(prompts)]
    groups = [g for g in range(prompts) for _ in range(samples)]
    batch = Batch({"group_id": torch.tensor(groups), "sample_kind": ["base"] * len(groups),
                   "response_mask": torch.ones(len(groups), 3, dtype=torch.bool),
                   "item_index": list(groups), "response_text": [f"{tag}{g}/{s}" for g in range(prompts)
                                                                 for s in range(samples)]})
    return SampledRound(items=items, batch=batch, live_groups=live)


def test_the_first_live_groups_fill_the_batch_in_round_order() -> None:
    rounds = [_round("a", {1}), _round("b", {0, 2}), _round("c", {0, 1, 2})]
    assert live_group_count(rounds) == 6
    items, batch, stats = assemble_rounds(rounds, prompts_per_step=3)
    assert items == ["a1", "b0", "b2"]
    assert batch["response_text"] == ["a1/0", "a1/1", "b0/0", "b0/1", "b2/0", "b2/1"]
    assert batch["group_id"].tolist() == [0, 0, 1, 1, 2, 2] and batch["item_index"] == [0, 0, 1, 1, 2, 2]
    assert stats.as_dict() == {"dynamic_sampling/rounds": 3.0, "dynamic_sampling/groups_sampled": 9.0,
                               "dynamic_sampling/groups_live": 6.0, "dynamic_sampling/groups_discarded": 6.0,
                               "dynamic_sampling/groups_short": 0.0,
                               "dynamic_sampling/tokens_discarded": 36.0}  # 6 groups x 2 samples x 3 tokens


def test_a_short_step_trains_its_live_groups_topped_up_with_the_earliest_others() -> None:
    rounds = [_round("a", set()), _round("b", {2})]
    items, batch, stats = assemble_rounds(rounds, prompts_per_step=3)
    assert items == ["b2", "a0", "a1"]  # the live group first, then the earliest groups without gradient
    assert batch["item_index"] == [0, 0, 1, 1, 2, 2]
    assert (stats.groups_live, stats.groups_short, stats.groups_discarded) == (1, 2, 3)
