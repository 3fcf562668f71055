"""The batch container that flows from rollout to the loss.

A `Batch` is a dict of per-sample fields: every value is a tensor whose first dimension is N or a
list of length N. Two keys are required:

- ``group_id``: integer tensor (N,). The advantage baseline and data-parallel sharding use this
  explicit id; they never compare prompt tokens (a correction prompt differs from its original).
- ``sample_kind``: list of N strings, each ``"base"`` (GRPO stream) or ``"correction"``.

Token keys (optional, but when present they are (N, T) tensors on one shared time axis T):
``input_ids`` (prompt + response tokens, right-padded), ``prompt_mask`` (bool, True on prompt
tokens), ``response_mask`` (bool, True on response tokens that are trained),
``generation_logprobs`` (log p_sampler(input_ids[:, t] | input_ids[:, <t]); 0 off the response),
``old_logprobs`` and ``reference_logprobs`` (same convention, from the trainer and the reference
policy). Per-sample keys such as ``rewards`` and ``advantages`` are (N,) tensors.
"""

from __future__ import annotations

import heapq
from collections.abc import ItemsView, Iterator, KeysView, Mapping, Sequence
from typing import Literal, TypeAlias

import torch

BatchValue: TypeAlias = torch.Tensor | list
SampleKind: TypeAlias = Literal["base", "correction"]

SAMPLE_KINDS: tuple[str, ...] = ("base", "correction")
REQUIRED_KEYS: tuple[str, ...] = ("group_id", "sample_kind")
TOKEN_KEYS: tuple[str, ...] = (
    "input_ids",
    "prompt_mask",
    "response_mask",
    "generation_logprobs",
    "old_logprobs",
    "reference_logprobs",
)
MASK_KEYS: tuple[str, ...] = ("prompt_mask", "response_mask")
_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


class Batch:
    """Per-sample fields with explicit groups; see the module docstring for the key conventions."""

    def __init__(self, data: Mapping[str, BatchValue]) -> None:
        missing = [key for key in REQUIRED_KEYS if key not in data]
        if missing:
            raise ValueError(f"Batch is missing required keys {missing}; present keys: {sorted(data)}")
        self._data: dict[str, BatchValue] = dict(data)
        self._num_samples = _length_of("group_id", self._data["group_id"])
        for key, value in self._data.items():
            self._validate_field(key, value)

    # ----- dict-like access -------------------------------------------------------------------

    def __len__(self) -> int:
        return self._num_samples

    def __getitem__(self, key: str) -> BatchValue:
        return self._data[key]

    def __setitem__(self, key: str, value: BatchValue) -> None:
        self._validate_field(key, value)
        self._data[key] = value

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def keys(self) -> KeysView[str]:
        return self._data.keys()

    def items(self) -> ItemsView[str, BatchValue]:
        return self._data.items()

    def __repr__(self) -> str:
        return f"Batch(num_samples={len(self)}, keys={list(self._data)})"

    # ----- selection ----------------------------------------------------------------------------

    def select(self, indices: Sequence[int] | torch.Tensor) -> Batch:
        """Samples at `indices`, in the order given (repeats allowed)."""
        index_list = _as_index_list(indices, len(self))
        selected: dict[str, BatchValue] = {}
        for key, value in self._data.items():
            if isinstance(value, torch.Tensor):
                selected[key] = value[torch.tensor(index_list, dtype=torch.long, device=value.device)]
            else:
                selected[key] = [value[i] for i in index_list]
        return Batch(selected)

    def slice(self, start: int, stop: int) -> Batch:
        """Samples start..stop-1; requires 0 <= start <= stop <= len(self)."""
        if not 0 <= start <= stop <= len(self):
            raise ValueError(f"slice({start}, {stop}) is out of range for a batch of {len(self)} samples")
        return Batch({key: value[start:stop] for key, value in self._data.items()})

    @staticmethod
    def concat(batches: Sequence[Batch], *, pad_values: Mapping[str, float | int] | None = None) -> Batch:
        """Stack batches along the sample axis.

        Tensors with 2 or more dims whose dim 1 differs are right-padded to the longest dim 1 with
        ``pad_values[key]`` (0, or False for bool masks, when the key is not given).
        """
        if not batches:
            raise ValueError("Batch.concat needs at least one batch")
        pads = dict(pad_values or {})
        reference_keys = set(batches[0].keys())
        for position, batch in enumerate(batches[1:], start=1):
            if set(batch.keys()) != reference_keys:
                differing = sorted(reference_keys.symmetric_difference(batch.keys()))
                raise ValueError(f"Batch.concat: batch {position} differs from batch 0 in keys {differing}")
        merged = {
            key: _concat_values(key, [batch[key] for batch in batches], pads.get(key, 0))
            for key in batches[0].keys()
        }
        return Batch(merged)

    # ----- groups and data-parallel sharding -------------------------------------------------

    def group_indices(self) -> dict[int, list[int]]:
        """Group id -> sample indices; groups in order of first appearance."""
        groups: dict[int, list[int]] = {}
        for index, group in enumerate(self._data["group_id"].tolist()):
            groups.setdefault(group, []).append(index)
        return groups

    def shard_by_tokens(self, num_shards: int) -> list[Batch]:
        """Split into `num_shards` training shards of about equal prompt + response tokens, sample by sample.

        For a train step, where groups no longer matter (advantages are computed) and the cost of a shard is its
        tokens: greedy and deterministic, samples taken longest first (ties: first appearance), each to the
        currently lightest shard (ties: lowest index); within a shard the samples keep their relative order.
        Every shard gets a sample, so there must be at least `num_shards` samples."""
        if not isinstance(num_shards, int) or num_shards < 1:
            raise ValueError(f"num_shards must be a positive int, got {num_shards!r}")
        if num_shards > len(self):
            raise ValueError(f"num_shards={num_shards} is larger than the number of samples ({len(self)})")
        tokens = (self._data["prompt_mask"] | self._response_mask()).sum(dim=1).tolist()
        shard_heap = [(0, shard) for shard in range(num_shards)]
        shard_samples: list[list[int]] = [[] for _ in range(num_shards)]
        for index in sorted(range(len(self)), key=lambda i: -tokens[i]):
            load, shard = heapq.heappop(shard_heap)
            shard_samples[shard].append(index)
            heapq.heappush(shard_heap, (load + tokens[index], shard))
        return [self.select(sorted(samples)) for samples in shard_samples]

    def micro_batches(self, micro_batch_size: int) -> list[Batch]:
        """Consecutive slices of `micro_batch_size` samples; the last one may be smaller."""
        if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be a positive int, got {micro_batch_size!r}")
        return [
            self.slice(start, min(start + micro_batch_size, len(self)))
            for start in range(0, len(self), micro_batch_size)
        ]

    # ----- counts and devices -----------------------------------------------------------------

    def num_valid_tokens(self) -> int:
        """Number of trained tokens (True entries of ``response_mask``)."""
        return int(self._response_mask().sum().item())

    def num_valid_sequences(self) -> int:
        """Number of samples with at least one trained token."""
        return int(self._response_mask().any(dim=1).sum().item())

    def to(self, device: torch.device | str) -> Batch:
        """A new batch with every tensor on `device` (lists are shared)."""
        return Batch(
            {
                key: value.to(device) if isinstance(value, torch.Tensor) else value
                for key, value in self._data.items()
            }
        )

    # ----- validation -------------------------------------------------------------------------

    def _response_mask(self) -> torch.Tensor:
        if "response_mask" not in self._data:
            raise ValueError(f"this operation needs the batch key 'response_mask'; keys: {list(self._data)}")
        return self._data["response_mask"]

    def _validate_field(self, key: str, value: BatchValue) -> None:
        length = _length_of(key, value)
        if length != self._num_samples:
            raise ValueError(f"Batch key {key!r} has length {length}, expected N={self._num_samples}")
        if key == "group_id" and not (isinstance(value, torch.Tensor) and value.dtype in _INTEGER_DTYPES):
            raise TypeError(f"Batch key 'group_id' must be an integer tensor, got {_describe(value)}")
        if key == "group_id" and value.dim() != 1:
            raise ValueError(f"Batch key 'group_id' must be 1-D (N,), got shape {tuple(value.shape)}")
        if key == "sample_kind":
            _validate_sample_kinds(value)
        if key in TOKEN_KEYS:
            self._validate_token_field(key, value)

    def _validate_token_field(self, key: str, value: BatchValue) -> None:
        if not isinstance(value, torch.Tensor) or value.dim() != 2:
            raise ValueError(f"Batch token key {key!r} must be an (N, T) tensor")
        if key in MASK_KEYS and value.dtype != torch.bool:
            raise TypeError(f"Batch key {key!r} must be a bool tensor, got dtype {value.dtype}")
        for other in TOKEN_KEYS:
            if other != key and other in self._data and self._data[other].shape[1] != value.shape[1]:
                raise ValueError(
                    f"Batch token key {key!r} has T={value.shape[1]} but {other!r} has "
                    f"T={self._data[other].shape[1]}; token keys share one time axis"
                )


def _length_of(key: str, value: object) -> int:
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            raise ValueError(f"Batch key {key!r} is a 0-dim tensor; per-sample fields need a first dimension N")
        return value.shape[0]
    if isinstance(value, list):
        return len(value)
    raise TypeError(f"Batch key {key!r} must be a torch.Tensor or a list, got {type(value).__name__}")


def _describe(value: BatchValue) -> str:
    return f"tensor of dtype {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__


def _validate_sample_kinds(kinds: BatchValue) -> None:
    if not isinstance(kinds, list):
        raise TypeError("Batch key 'sample_kind' must be a list of strings")
    unknown = sorted({repr(kind) for kind in kinds if kind not in SAMPLE_KINDS})
    if unknown:
        raise ValueError(f"Batch key 'sample_kind' has values {unknown}; allowed: {list(SAMPLE_KINDS)}")


def _as_index_list(indices: Sequence[int] | torch.Tensor, num_samples: int) -> list[int]:
    if isinstance(indices, torch.Tensor):
        if indices.dtype not in _INTEGER_DTYPES or indices.dim() != 1:
            raise TypeError(
                f"select() needs a 1-D integer index tensor, got shape {tuple(indices.shape)} {indices.dtype}"
            )
        index_list = indices.tolist()
    else:
        index_list = [int(index) for index in indices]
    out_of_range = [index for index in index_list if not 0 <= index < num_samples]
    if out_of_range:
        raise IndexError(f"select() indices {out_of_range} are out of range for {num_samples} samples")
    return index_list


def _concat_values(key: str, values: list[BatchValue], pad_value: float | int) -> BatchValue:
    if all(isinstance(value, list) for value in values):
        return [item for value in values for item in value]
    if not all(isinstance(value, torch.Tensor) for value in values):
        raise TypeError(f"Batch.concat: key {key!r} mixes tensors and lists")
    dtypes = {value.dtype for value in values}
    dims = {value.dim() for value in values}
    if len(dtypes) > 1 or len(dims) > 1:
        raise TypeError(f"Batch.concat: key {key!r} has differing dtypes {dtypes} or dims {dims}")
    if dims == {1}:
        return torch.cat(values)
    width = max(value.shape[1] for value in values)
    return torch.cat([_right_pad(value, width, pad_value) for value in values])


def _right_pad(value: torch.Tensor, width: int, pad_value: float | int) -> torch.Tensor:
    if value.shape[1] == width:
        return value
    padding = value.new_full((value.shape[0], width - value.shape[1], *value.shape[2:]), pad_value)
    return torch.cat([value, padding], dim=1)
