"""Mini-batches of one rollout batch: the plan of optimizer steps, their combined metrics, the LR schedule length."""

from pathlib import Path

import pytest
import torch

from cipo_nemo.config import load_config
from cipo_nemo.models.policy.microbatches import combine_optimizer_steps, plan_mini_batches

BASE = Path(__file__).resolve().parents[2] / "conf" / "cipo_base.yaml"


def _plan(num_samples: int, size: int | None, epochs: int, seed: int = 0) -> list[list[int]]:
    return plan_mini_batches(num_samples, size=size, epochs=epochs, generator=torch.Generator().manual_seed(seed))


def test_default_is_one_step_over_all_samples_in_order():
    assert _plan(10, None, 1) == [list(range(10))]
    assert _plan(10, 16, 1) == [list(range(10))]


def test_every_epoch_covers_every_sample_once_in_a_new_order():
    plan = _plan(10, 4, 3)
    assert [len(indices) for indices in plan] == [4, 4, 2] * 3
    epochs = [sum(plan[i : i + 3], []) for i in range(0, 9, 3)]
    assert all(sorted(epoch) == list(range(10)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3  # reshuffled every epoch
    assert _plan(10, 4, 3) == plan and _plan(10, 4, 3, seed=1) != plan  # a function of the seed


def test_combined_metrics_average_steps_and_add_counts():
    steps = [
        {"loss": 1.0, "clip_fraction_low": 0.0, "ratio_min": 1.0, "ratio_max": 1.0, "num_valid_tokens": 10.0,
         "grad_norm": 2.0, "lr": 1e-3},
        {"loss": 3.0, "clip_fraction_low": 0.2, "ratio_min": 0.5, "ratio_max": 1.5, "num_valid_tokens": 30.0,
         "grad_norm": 4.0, "lr": 5e-4},
    ]
    combined = combine_optimizer_steps(steps)
    assert combined == {"loss": 2.0, "clip_fraction_low": pytest.approx(0.1), "ratio_min": 0.5, "ratio_max": 1.5,
                        "num_valid_tokens": 40.0, "grad_norm": 3.0, "lr": 5e-4, "optimizer_steps": 2.0,
                        "optimizer_steps_skipped": 0.0}
    assert combine_optimizer_steps(steps[:1])["optimizer_steps"] == 1.0
    assert combine_optimizer_steps(steps[:1], skipped=2)["optimizer_steps_skipped"] == 2.0


@pytest.mark.parametrize(("overrides", "per_step"), [
    ([], 1),  # 8 x 8 base + 8 anchors x 8 = 128 samples in one step
    (["policy.train_global_batch_size=32"], 4),
    (["policy.train_global_batch_size=50", "policy.epochs_per_batch=2"], 6),  # ceil(128 / 50) = 3, twice
    (["policy.train_global_batch_size=32", "cipo.enabled=false"], 2),  # GRPO: 64 samples
])
def test_the_learning_rate_schedule_spans_every_optimizer_step(overrides, per_step):
    cfg = load_config(BASE, ["grpo.num_steps=10", *overrides])
    assert cfg.max_optimizer_steps() == 10 * per_step


@pytest.mark.parametrize(("overrides", "separate_pass"), [
    ([], False),  # one on-policy optimizer step, no KL, no TIS: pi_old comes from the training forward pass
    (["policy.train_global_batch_size=64"], True),  # 128 samples -> 2 optimizer steps: pi_old must be fixed
    (["policy.epochs_per_batch=2"], True),
    (["policy.train_global_batch_size=500"], False),
    (["loss.kl_beta=0.01", "policy.reference_policy=cpu_copy"], True),
    (["loss.importance_sampling=true"], True),
])
def test_the_pi_old_pass_runs_only_when_it_can_change_something(overrides, separate_pass):
    from types import SimpleNamespace

    from cipo_nemo.trainer import needs_old_logprobs

    cfg = load_config(BASE, overrides)
    assert needs_old_logprobs(SimpleNamespace(cfg=cfg), cfg.max_samples_per_step()) is separate_pass


def test_a_training_batch_is_ordered_shortest_first_with_every_sample_kept() -> None:
    from cipo_nemo.data.batch import Batch
    from cipo_nemo.data.packing import sequence_lengths
    from cipo_nemo.models.policy.microbatches import sorted_by_length

    lengths = [7, 3, 9, 3, 5]
    prompt_mask = torch.zeros(len(lengths), 10, dtype=torch.bool)
    response_mask = torch.zeros(len(lengths), 10, dtype=torch.bool)
    for row, length in enumerate(lengths):
        prompt_mask[row, :2] = True
        response_mask[row, 2:length] = True
    batch = Batch({"group_id": torch.arange(5), "sample_kind": ["base"] * 5, "prompt_mask": prompt_mask,
                   "response_mask": response_mask})
    ordered = sorted_by_length(batch)
    assert sequence_lengths(ordered) == [3, 3, 5, 7, 9]
    assert ordered["group_id"].tolist() == [1, 3, 4, 0, 2]  # stable: equal lengths keep their order


def _loss_batch(response_lengths: list[int], advantages: list[float]):
    from cipo_nemo.data.batch import Batch

    response_mask = torch.zeros(len(response_lengths), max(response_lengths), dtype=torch.bool)
    for row, length in enumerate(response_lengths):
        response_mask[row, :length] = True
    return Batch({"group_id": torch.arange(len(advantages)), "sample_kind": ["base"] * len(advantages),
                  "response_mask": response_mask, "advantages": torch.tensor(advantages)})


def _optimizer_steps(batch, live, *, size, epochs, normalization="token"):
    from cipo_nemo.algorithms.loss import PolicyLoss
    from cipo_nemo.models.policy.microbatches import plan_optimizer_steps

    loss = PolicyLoss(clip_low=0.2, clip_high=0.2, normalization=normalization, kl_beta=0.0, kl_estimator="k3",
                      importance_sampling=False, is_truncation=2.0, is_type="tis", is_lower_bound=0.5,
                      loss_weight=1.0)
    return plan_optimizer_steps(batch, loss, size=size, epochs=epochs, generator=torch.Generator().manual_seed(0),
                                carries_gradient=live)


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_the_skip_keeps_the_same_mini_batches_and_their_normalizers(normalization: str) -> None:
    lengths, advantages = [3, 1, 4, 1, 5, 9, 2, 6], [0.5, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 2.0]
    batch = _loss_batch(lengths, advantages)
    live = torch.tensor([a != 0 for a in advantages])
    full = _optimizer_steps(batch, None, size=3, epochs=2, normalization=normalization)
    skipped = _optimizer_steps(batch, live, size=3, epochs=2, normalization=normalization)
    assert [s.indices for s in full] == _plan(8, 3, 2)  # the draw of plan_mini_batches, unchanged
    for whole, kept in zip(full, skipped, strict=True):
        assert kept.indices == [i for i in whole.indices if advantages[i] != 0]
        assert kept.denominator == whole.denominator  # counted with the skipped samples in
        expected = sum(lengths[i] for i in whole.indices) if normalization == "token" else len(whole.indices)
        assert whole.denominator == expected
        assert kept.planned == whole.planned == len(whole.indices) and kept.skipped == whole.planned - len(kept.indices)
    assert any(not step.indices for step in skipped)  # a mini-batch of zero advantages only: nothing to train


def test_a_skipped_step_is_counted_and_its_loss_is_zero() -> None:
    combined = combine_optimizer_steps([], skipped=1)
    assert combined["optimizer_steps"] == 0.0 and combined["optimizer_steps_skipped"] == 1.0
    assert combined["loss"] == 0.0 and combined["num_valid_tokens"] == 0.0
