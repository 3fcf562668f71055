"""The resumable epoch-based prompt sampler."""

from __future__ import annotations

import pytest

from cipo_nemo.data.sampler import PromptSampler
from cipo_nemo.data.sources import DataError, TaskItem


def make_items(count: int) -> list[TaskItem]:
    return [
        TaskItem(id=str(index), family="math", prompt=f"Q{index}", messages=None, answer=str(index),
                 origin=f"test:{index}", metadata={})
        for index in range(count)
    ]


def ids(batch: list[TaskItem]) -> list[str]:
    return [item.id for item in batch]


def draw(sampler: PromptSampler, batches: int) -> list[list[str]]:
    return [ids(sampler.next_batch()) for _ in range(batches)]


def test_unshuffled_order_crosses_epoch_boundaries():
    sampler = PromptSampler(make_items(5), batch_size=2, seed=0, shuffle=False)
    assert draw(sampler, 3) == [["0", "1"], ["2", "3"], ["4", "0"]]
    assert sampler.epoch == 1
    assert sampler.state_dict() == {"epoch": 1, "position": 1, "seed": 0, "num_items": 5, "shuffle": 0}


def test_batch_larger_than_the_data_wraps_into_later_epochs():
    sampler = PromptSampler(make_items(3), batch_size=7, seed=0, shuffle=False)
    assert ids(sampler.next_batch()) == ["0", "1", "2", "0", "1", "2", "0"]
    assert sampler.epoch == 2


def test_same_seed_same_order_different_seed_different_order():
    first = draw(PromptSampler(make_items(20), batch_size=4, seed=7, shuffle=True), 10)
    again = draw(PromptSampler(make_items(20), batch_size=4, seed=7, shuffle=True), 10)
    other = draw(PromptSampler(make_items(20), batch_size=4, seed=8, shuffle=True), 10)
    assert first == again
    assert first != other


def test_each_epoch_is_a_permutation_and_epochs_differ():
    items = make_items(12)
    sampler = PromptSampler(items, batch_size=4, seed=1, shuffle=True)
    epoch_0 = sum(draw(sampler, 3), [])
    epoch_1 = sum(draw(sampler, 3), [])
    assert sorted(epoch_0, key=int) == [item.id for item in items]
    assert sorted(epoch_1, key=int) == [item.id for item in items]
    assert epoch_0 != [item.id for item in items]  # shuffled
    assert epoch_0 != epoch_1


def test_resume_from_state_gives_the_same_next_batches():
    original = PromptSampler(make_items(7), batch_size=3, seed=5, shuffle=True)
    draw(original, 3)
    state = original.state_dict()
    assert state == {"epoch": 1, "position": 2, "seed": 5, "num_items": 7, "shuffle": 1}

    resumed = PromptSampler(make_items(7), batch_size=3, seed=5, shuffle=True)
    resumed.load_state_dict(state)
    assert resumed.epoch == 1
    assert draw(resumed, 5) == draw(original, 5)


def test_load_state_rejects_a_different_dataset_or_seed():
    state = PromptSampler(make_items(7), batch_size=3, seed=5, shuffle=True).state_dict()
    with pytest.raises(DataError, match="saved with num_items=7 but this run has num_items=8"):
        PromptSampler(make_items(8), batch_size=3, seed=5, shuffle=True).load_state_dict(state)
    with pytest.raises(DataError, match="saved with seed=5 but this run has seed=6"):
        PromptSampler(make_items(7), batch_size=3, seed=6, shuffle=True).load_state_dict(state)
    with pytest.raises(DataError, match="lacks shuffle"):
        PromptSampler(make_items(7), batch_size=3, seed=5, shuffle=True).load_state_dict(
            {"epoch": 0, "position": 0, "seed": 5, "num_items": 7}
        )


def test_batch_size_below_one_is_rejected():
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        PromptSampler(make_items(3), batch_size=0, seed=0, shuffle=True)
