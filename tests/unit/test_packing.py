"""Sequence packing: row plans, packed inputs, masks, boundaries and the way back to per-sample logprobs."""

import pytest
import torch

from cipo_nemo.data.batch import Batch
from cipo_nemo.data.packing import (
    PackedRow,
    block_causal_mask,
    cu_seqlens,
    pack_row,
    packed_length,
    plan_packed_rows,
    restore_order,
    sequence_lengths,
    sequence_pad_multiple,
    unpack_logprobs,
)


def _batch(lengths: list[int], width: int = 10) -> Batch:
    """Sample i holds tokens 100*i + 1, 100*i + 2, ... (prompt 2 tokens, then response), right-padded with 0."""
    n = len(lengths)
    input_ids = torch.zeros(n, width, dtype=torch.long)
    prompt_mask = torch.zeros(n, width, dtype=torch.bool)
    response_mask = torch.zeros(n, width, dtype=torch.bool)
    for i, length in enumerate(lengths):
        input_ids[i, :length] = torch.arange(1, length + 1) + 100 * i
        prompt_mask[i, :2] = True
        response_mask[i, 2:length] = True
    return Batch({"group_id": torch.arange(n), "sample_kind": ["base"] * n, "input_ids": input_ids,
                  "prompt_mask": prompt_mask, "response_mask": response_mask})


def test_sequence_lengths_are_last_real_position_plus_one():
    assert sequence_lengths(_batch([3, 10, 5])) == [3, 10, 5]


def test_first_fit_decreasing_fills_rows_and_keeps_every_sample_once():
    lengths = [6, 3, 7, 2, 4, 8]
    rows = plan_packed_rows(lengths, capacity=10)
    # longest first: 8 -> row A, 7 -> row B, 6 -> row C, 4 -> C (10), 3 -> B (10), 2 -> A (10)
    assert [row.indices for row in rows] == [(0, 4), (1, 2), (3, 5)]
    assert [row.num_tokens for row in rows] == [10, 10, 10]
    assert sorted(i for row in rows for i in row.indices) == list(range(len(lengths)))
    assert all(row.lengths == tuple(lengths[i] for i in row.indices) for row in rows)
    assert rows[1].offsets == (0, 3)


def test_a_sample_longer_than_a_row_is_a_clear_error():
    with pytest.raises(ValueError, match="sample 1 has 12 tokens, more than a packed micro-batch holds \\(10\\)"):
        plan_packed_rows([4, 12], capacity=10)


def test_packed_lengths_round_to_the_tp_multiple_and_are_uniform_under_pp():
    rows = [PackedRow((0,), (5,)), PackedRow((1, 2), (4, 4))]
    assert packed_length(rows, multiple=1, uniform=False) == [5, 8]
    assert packed_length(rows, multiple=4, uniform=False) == [8, 8]
    assert packed_length(rows, multiple=3, uniform=True) == [9, 9]


def test_pack_row_concatenates_restarts_positions_and_pads_as_its_own_segment():
    batch = _batch([3, 10, 4])
    row = PackedRow(indices=(0, 2), lengths=(3, 4))
    packed = pack_row(batch["input_ids"], row, length=9, pad_id=0)
    assert packed.input_ids.tolist() == [[1, 2, 3, 201, 202, 203, 204, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1]]
    assert packed.segment_ids.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2, 2]]
    with pytest.raises(ValueError, match="does not fit"):
        pack_row(batch["input_ids"], row, length=6)


def test_block_causal_mask_keeps_attention_inside_each_sample():
    segments = torch.tensor([[0, 0, 1, 1, 1]])
    allowed = ~block_causal_mask(segments)[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(allowed, expected)


def test_cu_seqlens_cover_the_samples_and_the_trailing_padding():
    row = PackedRow(indices=(0, 1), lengths=(3, 4))
    assert cu_seqlens(row, 7).tolist() == [0, 3, 7]
    assert cu_seqlens(row, 8).tolist() == [0, 3, 7, 8]
    assert cu_seqlens(row, 8).dtype == torch.int32


def test_unpack_logprobs_zeroes_each_first_token_and_pads_to_full_length():
    row = PackedRow(indices=(4, 1), lengths=(2, 3))
    packed = torch.tensor([-9.0, -1.0, -9.0, -2.0, -3.0, -7.0])  # position 2 is sample 0's guess at sample 1
    unpacked = unpack_logprobs(packed, row, full_length=4)
    assert unpacked.tolist() == [[0.0, -1.0, 0.0, 0.0], [0.0, -2.0, -3.0, 0.0]]


def test_restore_order_puts_rows_back_in_shard_order():
    rows = [PackedRow((1, 3), (2, 2)), PackedRow((0, 2), (2, 2))]
    parts = [torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [2.0]])]
    assert restore_order(parts, rows).flatten().tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    ("tp", "fp8", "recipe", "multiple"),
    [(2, None, "blockwise", 2), (1, "e4m3", "delayed", 16), (2, "hybrid", "tensorwise", 32),
     (4, "e4m3", "mxfp8", 128), (2, "e4m3", "blockwise", 256)],
)
def test_sequence_pad_multiple_is_tp_times_what_te_fp8_gemms_need(tp, fp8, recipe, multiple):
    assert sequence_pad_multiple(tp, fp8, recipe) == multiple


def test_fp8_blockwise_packed_rows_of_odd_lengths_pad_to_tp_times_128():
    rows = plan_packed_rows([37, 5, 91, 13], capacity=160)
    lengths = packed_length(rows, multiple=sequence_pad_multiple(2, "e4m3", "blockwise"), uniform=False)
    assert [row.num_tokens for row in rows] == [146]  # everything fits one row: 146 real tokens
    assert lengths == [256]  # each TP rank's 128 tokens are one FP8 block
    packed = pack_row(_batch([37, 5, 91, 13], width=100)["input_ids"], rows[0], lengths[0])
    assert packed.segment_ids[0, -110:].eq(4).all()  # the 110 padding tokens are one segment of their own
    assert cu_seqlens(rows[0], lengths[0]).tolist() == [0, 37, 42, 133, 146, 256]
