"""Epoch-based prompt sampling whose whole state is four integers, so a checkpoint resumes the exact order.

Epoch e's order is a permutation drawn from a generator seeded by (seed, e): nothing but (epoch, position) has
to be saved. Batches run across epoch boundaries; every item appears exactly once per epoch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from cipo_nemo.data.sources import DataError, TaskItem

_STATE_KEYS = ("epoch", "position", "seed", "num_items", "shuffle")


class PromptSampler:
    """Draws `batch_size` items per call, epoch after epoch (batch_size may exceed the number of items)."""

    def __init__(self, items: Sequence[TaskItem], *, batch_size: int, seed: int, shuffle: bool) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not items:
            raise ValueError("PromptSampler needs at least one item")
        self._items = list(items)
        self._batch_size = batch_size
        self._seed = seed
        self._shuffle = shuffle
        self._epoch = 0
        self._position = 0  # index into the current epoch's order of the next item drawn; always < len(items)
        self._order = self._epoch_order(0)

    @property
    def epoch(self) -> int:
        """The epoch the next item comes from (0-based)."""
        return self._epoch

    def next_batch(self) -> list[TaskItem]:
        batch = []
        for _ in range(self._batch_size):
            batch.append(self._items[self._order[self._position]])
            self._position += 1
            if self._position == len(self._items):
                self._start_epoch(self._epoch + 1)
        return batch

    def state_dict(self) -> dict[str, int]:
        """Where the sampler stands, plus what must match on load (seed, item count, shuffle)."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self._seed,
            "num_items": len(self._items),
            "shuffle": int(self._shuffle),
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise DataError(f"sampler state lacks {', '.join(missing)}: not a PromptSampler checkpoint")
        expected = self.state_dict()
        for key in ("num_items", "seed", "shuffle"):
            if state[key] != expected[key]:
                raise DataError(
                    f"sampler state was saved with {key}={state[key]} but this run has {key}={expected[key]}: "
                    "the data or the seed changed since the checkpoint, so its data order cannot be resumed"
                )
        if not 0 <= state["position"] < len(self._items) or state["epoch"] < 0:
            raise DataError(f"sampler state is corrupt: epoch={state['epoch']}, position={state['position']}")
        self._start_epoch(state["epoch"])
        self._position = state["position"]

    def _start_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self._position = 0
        self._order = self._epoch_order(epoch)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self._shuffle:
            return np.arange(len(self._items))
        return np.random.default_rng([self._seed, epoch]).permutation(len(self._items))
