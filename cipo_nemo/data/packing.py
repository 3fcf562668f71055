"""Sequence packing: the samples of a micro-batch concatenated into one row, each attending only to itself.

With `policy.sequence_packing: true` a micro-batch is a token budget instead of a sample count: whole samples,
placed first-fit decreasing, fill rows of at most `capacity` tokens (the policies use `micro_batch_size x
max_total_sequence_length`, what an unpacked micro-batch of full-length rows holds), and the padding that
right-padded rows carry is gone. Within a row, position ids restart at 0 for every sample and attention stays
inside each sample:

- Transformer Engine (GPU): THD format, the sample boundaries as `cu_seqlens` (megatron's PackedSeqParams);
- megatron's local spec (CPU) and HF: a block-diagonal causal mask, explicit (megatron) or built by transformers
  from the restarting position ids (HF, masking_utils.find_packed_sequence_indices).

Trailing padding (to `sequence_pad_multiple`: the TP size, times what Transformer Engine's FP8 GEMMs need when FP8
training is on; or to the longest row under PP, whose stages exchange fixed-shape activations) is one more segment
of its own, so it attends to nothing real and nothing real attends
to it. The loss is unchanged by packing: every micro-batch loss is divided by the one global denominator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F

from cipo_nemo.data.batch import Batch


@dataclass(frozen=True)
class PackedRow:
    """Which samples of a shard share one packed row, in order, and how many tokens each has."""

    indices: tuple[int, ...]
    lengths: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of every sample in the row."""
        return (0, *accumulate(self.lengths))[:-1]


def sequence_lengths(batch: Batch) -> list[int]:
    """Tokens of every sample: the last prompt-or-response position + 1 (rows are right-padded)."""
    sequence_mask = batch["prompt_mask"] | batch["response_mask"]
    positions = torch.arange(1, sequence_mask.shape[1] + 1)
    return (positions * sequence_mask).max(dim=1).values.tolist()


def plan_packed_rows(lengths: Sequence[int], capacity: int) -> list[PackedRow]:
    """First-fit decreasing: each sample, longest first, goes into the first row with room for it.

    Deterministic (ties keep shard order) and, within a row, samples stay in shard order.
    """
    too_long = [(index, length) for index, length in enumerate(lengths) if length > capacity]
    if too_long:
        index, length = too_long[0]
        raise ValueError(
            f"sample {index} has {length} tokens, more than a packed micro-batch holds ({capacity}); "
            "raise policy.max_total_sequence_length"
        )
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        target = next((row for row, free in enumerate(room) if free >= lengths[index]), None)
        if target is None:
            rows.append([])
            room.append(capacity)
            target = len(rows) - 1
        rows[target].append(index)
        room[target] -= lengths[index]
    return [
        PackedRow(indices=tuple(sorted(row)), lengths=tuple(lengths[i] for i in sorted(row)))
        for row in sorted(rows, key=min)
    ]


def packed_length(rows: Sequence[PackedRow], *, multiple: int, uniform: bool) -> list[int]:
    """Padded length of every row: a multiple of `multiple`; the longest row's for all when `uniform` (PP)."""
    lengths = [round_up(row.num_tokens, multiple) for row in rows]
    return [max(lengths)] * len(rows) if uniform else lengths


# Tokens per GEMM that Transformer Engine's FP8 recipes need the token dimension to be divisible by: 16 for the
# per-tensor recipes, 32 for MXFP8 (1x32 scale blocks), 128 for blockwise (1x128 / 128x128 blocks).
FP8_TOKEN_MULTIPLE = {"delayed": 16, "tensorwise": 16, "mxfp8": 32, "blockwise": 128}


def sequence_pad_multiple(tp: int, fp8: str | None, fp8_recipe: str) -> int:
    """What every (packed or unpacked) row's length must be a multiple of: TP (sequence parallelism scatters the
    sequence over the TP ranks), times the FP8 token multiple when FP8 training is on, so that each TP rank's
    share of the tokens still fits TE's FP8 GEMMs."""
    if fp8 is None:
        return tp
    if fp8_recipe not in FP8_TOKEN_MULTIPLE:
        raise ValueError(f"policy.megatron.fp8_recipe {fp8_recipe!r} is not one of {sorted(FP8_TOKEN_MULTIPLE)}")
    return tp * FP8_TOKEN_MULTIPLE[fp8_recipe]


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class PackedInputs:
    """One packed row as the model takes it; every tensor is (1, length)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor  # restarts at 0 for every sample and for the trailing padding
    segment_ids: torch.Tensor  # sample k of the row -> k; trailing padding -> len(row.indices)


def pack_row(input_ids: torch.Tensor, row: PackedRow, length: int, *, pad_id: int = 0) -> PackedInputs:
    """Concatenate the row's samples (rows of the shard's right-padded `input_ids`) and pad to `length`."""
    if length < row.num_tokens:
        raise ValueError(f"a packed row of {row.num_tokens} tokens does not fit in length {length}")
    pieces = [input_ids[index, :n].long() for index, n in zip(row.indices, row.lengths)]
    pad = length - row.num_tokens
    tokens = torch.cat([*pieces, torch.full((pad,), pad_id, dtype=torch.long)])
    spans = [*row.lengths, pad] if pad else list(row.lengths)
    positions = torch.cat([torch.arange(n) for n in spans])
    segments = torch.cat([torch.full((n,), k) for k, n in enumerate(spans)])
    return PackedInputs(tokens[None], positions[None], segments[None])


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(1, 1, S, S) bool, True where attention is masked (megatron's convention): mask[q, k] = not
    (segment[q] == segment[k] and k <= q)."""
    segments = segment_ids[0]
    same_sample = segments[:, None] == segments[None, :]
    causal = torch.ones_like(same_sample).tril()
    return ~(same_sample & causal)[None, None]


def cu_seqlens(row: PackedRow, length: int) -> torch.Tensor:
    """int32 cumulative segment boundaries [0, L_1, L_1 + L_2, ..., length] (trailing padding is a segment)."""
    bounds = [0, *accumulate(row.lengths)]
    if length > bounds[-1]:
        bounds.append(length)
    return torch.tensor(bounds, dtype=torch.int32)


def unpack_logprobs(packed: torch.Tensor, row: PackedRow, full_length: int) -> torch.Tensor:
    """(len(row), full_length) per-sample logprobs from the packed row's (S,) `packed[j] = log p(token j | ...)`.

    Each sample's first position is 0 (nothing predicts it: `packed` there is the previous sample's guess at
    the next token) and positions past its length are 0, as in the unpacked convention.
    """
    per_sample = []
    for offset, n in zip(row.offsets, row.lengths):
        logprobs = packed[offset : offset + n].clone()
        logprobs[0] = 0.0
        per_sample.append(F.pad(logprobs, (0, full_length - n)))
    return torch.stack(per_sample)


def restore_order(parts: Sequence[torch.Tensor], rows: Sequence[PackedRow]) -> torch.Tensor:
    """Rows of the shard back in shard order from per-packed-row results (row k of parts[i] is rows[i].indices[k])."""
    indices = torch.tensor([index for row in rows for index in row.indices])
    stacked = torch.cat(list(parts))
    result = torch.empty_like(stacked)
    result[indices] = stacked
    return result
