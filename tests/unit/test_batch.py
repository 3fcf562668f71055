import pytest
import torch

from cipo_nemo.data.batch import Batch


def make_batch(group_ids: list[int], response_lengths: list[int] | None = None, width: int = 4) -> Batch:
    """Batch with input_ids = 10*i + t and a response mask of the given lengths (default: full)."""
    num_samples = len(group_ids)
    lengths = response_lengths if response_lengths is not None else [width] * num_samples
    positions = torch.arange(width)
    return Batch(
        {
            "group_id": torch.tensor(group_ids),
            "sample_kind": ["base"] * num_samples,
            "input_ids": torch.arange(num_samples)[:, None] * 10 + positions,
            "response_mask": positions[None, :] < torch.tensor(lengths)[:, None],
            "rewards": torch.arange(num_samples, dtype=torch.float32),
        }
    )


# ----- validation -----------------------------------------------------------------------------------------


def test_missing_required_key_is_named():
    with pytest.raises(ValueError, match="sample_kind"):
        Batch({"group_id": torch.tensor([0, 1])})


def test_length_mismatch_names_key_and_lengths():
    with pytest.raises(ValueError, match=r"'rewards' has length 3, expected N=2"):
        Batch({"group_id": torch.tensor([0, 1]), "sample_kind": ["base", "base"], "rewards": torch.zeros(3)})


def test_unknown_sample_kind_is_named():
    with pytest.raises(ValueError, match="'rollout'"):
        Batch({"group_id": torch.tensor([0, 1]), "sample_kind": ["base", "rollout"]})


def test_group_id_must_be_integer():
    with pytest.raises(TypeError, match="group_id"):
        Batch({"group_id": torch.tensor([0.0, 1.0]), "sample_kind": ["base", "base"]})


def test_token_keys_share_time_axis_and_masks_are_bool():
    batch = make_batch([0, 0], width=4)
    with pytest.raises(ValueError, match="'generation_logprobs' has T=3"):
        batch["generation_logprobs"] = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="'prompt_mask' must be a bool"):
        batch["prompt_mask"] = torch.zeros(2, 4, dtype=torch.long)


def test_setitem_validates_length():
    batch = make_batch([0, 0, 1])
    with pytest.raises(ValueError, match=r"'advantages' has length 2, expected N=3"):
        batch["advantages"] = torch.zeros(2)
    batch["advantages"] = torch.ones(3)
    assert torch.equal(batch["advantages"], torch.ones(3))
    assert "advantages" in batch and len(batch) == 3


def test_stores_a_shallow_copy():
    data = {"group_id": torch.tensor([0]), "sample_kind": ["base"]}
    batch = Batch(data)
    data["rewards"] = torch.zeros(1)
    assert "rewards" not in batch


# ----- select / slice / concat ---------------------------------------------------------------------------


def test_select_keeps_given_order_for_tensors_and_lists():
    batch = make_batch([0, 0, 1, 1])
    batch["sample_kind"] = ["base", "correction", "base", "correction"]
    for indices in ([3, 0, 1], torch.tensor([3, 0, 1])):
        selected = batch.select(indices)
        assert selected["group_id"].tolist() == [1, 0, 0]
        assert selected["sample_kind"] == ["correction", "base", "correction"]
        assert selected["input_ids"][:, 0].tolist() == [30, 0, 10]
    with pytest.raises(IndexError, match=r"\[4\]"):
        batch.select([4])


def test_slice():
    batch = make_batch([0, 0, 1, 1, 2])
    sliced = batch.slice(1, 3)
    assert sliced["rewards"].tolist() == [1.0, 2.0]
    assert sliced["sample_kind"] == ["base", "base"]
    with pytest.raises(ValueError, match="out of range"):
        batch.slice(2, 6)


def test_concat_right_pads_token_keys_and_joins_lists():
    short = make_batch([0], response_lengths=[2], width=2)
    long = make_batch([1, 1], response_lengths=[3, 1], width=3)
    long["sample_kind"] = ["correction", "base"]
    joined = Batch.concat([short, long], pad_values={"input_ids": -1})
    # short's row [0, 1] is padded with -1 to width 3; long's rows are 10*i + t
    assert joined["input_ids"].tolist() == [[0, 1, -1], [0, 1, 2], [10, 11, 12]]
    # masks pad with the default 0 -> False
    assert joined["response_mask"].tolist() == [[True, True, False], [True, True, True], [True, False, False]]
    assert joined["sample_kind"] == ["base", "correction", "base"]
    assert joined["group_id"].tolist() == [0, 1, 1]
    assert joined["rewards"].tolist() == [0.0, 0.0, 1.0]


def test_concat_names_differing_keys():
    first = make_batch([0])
    second = make_batch([1])
    second["advantages"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"\['advantages'\]"):
        Batch.concat([first, second])


# ----- groups and shards ---------------------------------------------------------------------------------


def test_group_indices_in_first_appearance_order():
    groups = make_batch([7, 3, 7, 3, 5]).group_indices()
    assert groups == {7: [0, 2], 3: [1, 3], 5: [4]}
    assert list(groups) == [7, 3, 5]


def _with_prompts(batch: Batch, prompt_lengths: list[int]) -> Batch:
    width = batch["response_mask"].shape[1]
    batch["prompt_mask"] = torch.arange(width)[None, :] < torch.tensor(prompt_lengths)[:, None]
    batch["response_mask"] = batch["response_mask"] & ~batch["prompt_mask"]
    return batch


def test_shard_by_tokens_balances_sequence_tokens_sample_by_sample():
    # sequence tokens (prompt + response) 8, 2, 7, 3, 5, 1 in a batch of width 8; samples of one group may split
    batch = _with_prompts(make_batch([0, 0, 1, 1, 2, 2], response_lengths=[8, 2, 7, 3, 5, 1], width=8),
                          prompt_lengths=[2, 1, 2, 1, 2, 1])
    shards = batch.shard_by_tokens(2)
    # longest first to the lightest shard (ties: lower index): 8 -> s0, 7 -> s1, 5 -> s1, 3 -> s0, 2 -> s0, 1 -> s1
    assert [(shard["input_ids"][:, 0] // 10).tolist() for shard in shards] == [[0, 1, 3], [2, 4, 5]]
    assert [int((shard["prompt_mask"] | shard["response_mask"]).sum()) for shard in shards] == [13, 13]
    again = batch.shard_by_tokens(2)  # deterministic
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(shards, again))


def test_shard_by_tokens_needs_a_sample_per_shard():
    batch = _with_prompts(make_batch([0, 0]), prompt_lengths=[1, 1])
    with pytest.raises(ValueError, match="num_shards=3 is larger than the number of samples \\(2\\)"):
        batch.shard_by_tokens(3)
    with pytest.raises(ValueError, match="positive int"):
        batch.shard_by_tokens(0)


def test_micro_batches():
    micro = make_batch([0, 0, 1, 1, 2, 2, 3]).micro_batches(3)
    assert [mb["rewards"].tolist() for mb in micro] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [6.0]]
    with pytest.raises(ValueError, match="micro_batch_size"):
        make_batch([0]).micro_batches(0)


def test_valid_counts_and_to():
    batch = make_batch([0, 0, 1], response_lengths=[3, 0, 2])
    # 3 + 0 + 2 tokens; 2 samples with >= 1 token
    assert batch.num_valid_tokens() == 5
    assert batch.num_valid_sequences() == 2
    moved = batch.to("cpu")
    assert moved["input_ids"].device.type == "cpu" and moved.keys() == batch.keys()
    with pytest.raises(ValueError, match="response_mask"):
        Batch({"group_id": torch.tensor([0]), "sample_kind": ["base"]}).num_valid_tokens()
