import math

import pytest
import torch

from cipo_nemo.algorithms.loss import PolicyLoss, aggregate_metrics, clipped_pg_loss
from cipo_nemo.data.batch import Batch

F64 = torch.float64


def ratio_example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """2 x 3 example, clip 0.2 on both sides, pi_old = e^-1 everywhere.

    row 0: A = +1, ratios [1.5, 0.5, 1.0]           -> high clip active at t0
    row 1: A = -1, ratios [0.5, 1.5, padding (NaN)] -> low clip active at t0
    """
    old_logprobs = torch.full((2, 3), -1.0, dtype=F64)
    ratios = torch.tensor([[1.5, 0.5, 1.0], [0.5, 1.5, 1.0]], dtype=F64)
    logprobs = old_logprobs + ratios.log()
    logprobs[1, 2] = math.nan
    mask = torch.tensor([[True, True, True], [True, True, False]])
    advantages = torch.tensor([1.0, -1.0], dtype=F64)
    return logprobs.requires_grad_(), old_logprobs, advantages, mask


# per-token losses -min(r A, clip(r, 0.8, 1.2) A):
#   row 0: -min(1.5, 1.2) = -1.2, -min(0.5, 0.8) = -0.5, -min(1.0, 1.0) = -1.0     (sum -2.7)
#   row 1: -min(-0.5, -0.8) = 0.8, -min(-1.5, -1.2) = 1.5                          (sum  2.3)


def test_token_loss_and_metrics_hand_computed():
    logprobs, old_logprobs, advantages, mask = ratio_example()
    loss, metrics = clipped_pg_loss(logprobs, old_logprobs, advantages, mask)
    # (-2.7 + 2.3) / 5 valid tokens = -0.08
    assert loss.item() == pytest.approx(-0.08, abs=1e-12)
    # one token of five on each clip side
    assert metrics["clip_fraction_high"].item() == pytest.approx(0.2)
    assert metrics["clip_fraction_low"].item() == pytest.approx(0.2)
    # (1.5 + 0.5 + 1.0 + 0.5 + 1.5) / 5 = 1.0
    assert metrics["ratio_mean"].item() == pytest.approx(1.0, abs=1e-12)
    assert metrics["ratio_min"].item() == pytest.approx(0.5, abs=1e-12)
    assert metrics["ratio_max"].item() == pytest.approx(1.5, abs=1e-12)
    assert metrics["num_valid_tokens"].item() == 5
    assert all(not value.requires_grad for value in metrics.values())


def test_token_gradients_vanish_on_the_clipped_side():
    logprobs, old_logprobs, advantages, mask = ratio_example()
    loss, _ = clipped_pg_loss(logprobs, old_logprobs, advantages, mask)
    loss.backward()
    # d l_t / d logprob_t = -A r / D where the unclipped branch is active, 0 where the clip is active:
    #   row 0: t0 A>0, r=1.5>1.2 -> 0;  t1 r=0.5 (unclipped branch) -> -0.5/5;  t2 r=1 -> -1/5
    #   row 1: t0 A<0, r=0.5<0.8 -> 0;  t1 r=1.5 (unclipped branch) -> 1.5/5;  padding -> 0
    expected = torch.tensor([[0.0, -0.1, -0.2], [0.0, 0.3, 0.0]], dtype=F64)
    torch.testing.assert_close(logprobs.grad, expected, rtol=0, atol=1e-12)


def test_asymmetric_clip_keeps_gradient_inside_the_higher_bound():
    old_logprobs = torch.zeros(1, 2, dtype=F64)
    logprobs = torch.tensor([[1.25, 1.35]], dtype=F64).log().requires_grad_()
    loss, metrics = clipped_pg_loss(
        logprobs, old_logprobs, torch.ones(1, dtype=F64), torch.ones(1, 2, dtype=torch.bool),
        clip_low=0.2, clip_high=0.28,
    )
    loss.backward()
    # r = 1.25 <= 1.28 -> loss -1.25, grad -1.25 / 2;  r = 1.35 > 1.28 -> loss -1.28, grad 0
    assert loss.item() == pytest.approx((-1.25 - 1.28) / 2, abs=1e-12)
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.625, 0.0]], dtype=F64), rtol=0, atol=1e-12)
    assert metrics["clip_fraction_high"].item() == pytest.approx(0.5)


def test_sequence_normalization_hand_computed():
    logprobs, old_logprobs, advantages, mask = ratio_example()
    loss, _ = clipped_pg_loss(logprobs, old_logprobs, advantages, mask, normalization="sequence")
    # (-2.7 / 3 + 2.3 / 2) / 2 sequences = (-0.9 + 1.15) / 2 = 0.125
    assert loss.item() == pytest.approx(0.125, abs=1e-12)
    loss.backward()
    # -A r / (n_i * D): row 0 (n=3, D=2): -0.5/6, -1/6;  row 1 (n=2): 1.5/4
    expected = torch.tensor([[0.0, -0.5 / 6, -1 / 6], [0.0, 0.375, 0.0]], dtype=F64)
    torch.testing.assert_close(logprobs.grad, expected, rtol=0, atol=1e-12)


def test_global_denominator_replaces_local_count():
    logprobs, old_logprobs, advantages, mask = ratio_example()
    loss, _ = clipped_pg_loss(logprobs, old_logprobs, advantages, mask, global_denominator=10)
    # -0.4 / 10
    assert loss.item() == pytest.approx(-0.04, abs=1e-12)
    with pytest.raises(ValueError, match="smaller than this micro-batch's own 5 valid tokens"):
        clipped_pg_loss(logprobs, old_logprobs, advantages, mask, global_denominator=4)


def test_token_weights_per_sample_and_per_token():
    logprobs, old_logprobs, advantages, mask = ratio_example()
    loss, _ = clipped_pg_loss(
        logprobs, old_logprobs, advantages, mask, token_weights=torch.tensor([1.0, 0.5], dtype=F64)
    )
    # (-2.7 + 0.5 * 2.3) / 5 = -0.31
    assert loss.item() == pytest.approx(-0.31, abs=1e-12)
    per_token = torch.tensor([[0.0, 1.0, 1.0], [2.0, 1.0, 1.0]], dtype=F64)
    loss, _ = clipped_pg_loss(logprobs, old_logprobs, advantages, mask, token_weights=per_token)
    # (0 * -1.2 - 0.5 - 1.0 + 2 * 0.8 + 1.5) / 5 = 1.6 / 5 = 0.32
    assert loss.item() == pytest.approx(0.32, abs=1e-12)


def test_empty_mask_gives_zero_loss_without_nan():
    logprobs, old_logprobs, advantages, _ = ratio_example()
    empty = torch.zeros(2, 3, dtype=torch.bool)
    for normalization in ("token", "sequence"):
        loss, metrics = clipped_pg_loss(logprobs, old_logprobs, advantages, empty, normalization=normalization)
        loss.backward()
        assert loss.item() == 0.0
        assert torch.equal(logprobs.grad, torch.zeros(2, 3, dtype=F64))
        assert metrics["clip_fraction_low"].item() == 0.0 and metrics["ratio_mean"].item() == 0.0
        assert metrics["ratio_min"].item() == math.inf and metrics["ratio_max"].item() == -math.inf
        logprobs.grad = None


def test_shape_errors():
    logprobs, old_logprobs, advantages, mask = ratio_example()
    with pytest.raises(ValueError, match="advantages must have shape"):
        clipped_pg_loss(logprobs, old_logprobs, torch.zeros(3, dtype=F64), mask)
    with pytest.raises(ValueError, match="mask has shape"):
        clipped_pg_loss(logprobs, old_logprobs, advantages, mask[:, :2])


# ----- PolicyLoss -----------------------------------------------------------------------------------------


def make_loss(**overrides) -> PolicyLoss:
    options = {
        "clip_low": 0.2,
        "clip_high": 0.2,
        "normalization": "token",
        "kl_beta": 0.0,
        "kl_estimator": "k3",
        "importance_sampling": False,
        "is_truncation": 2.0,
        "is_type": "tis",
        "is_lower_bound": 0.5,
        "loss_weight": 1.0,
    }
    return PolicyLoss(**(options | overrides))


def make_policy_batch(old_logprobs: torch.Tensor, **fields) -> Batch:
    num_samples = old_logprobs.shape[0]
    data = {
        "group_id": torch.zeros(num_samples, dtype=torch.long),
        "sample_kind": ["base"] * num_samples,
        "response_mask": torch.ones_like(old_logprobs, dtype=torch.bool),
        "advantages": torch.ones(num_samples, dtype=F64),
        "old_logprobs": old_logprobs,
        "generation_logprobs": old_logprobs.clone(),
    }
    return Batch(data | fields)


@pytest.mark.parametrize(
    ("estimator", "expected_kl"),
    [
        # k1 = lp - ref = [-1 + 1.5, -2 + 1] = [0.5, -1.0]; mean -0.25
        ("k1", -0.25),
        # d = ref - lp = [-0.5, 1]; k3 = [e^-0.5 + 0.5 - 1, e - 1 - 1] = [0.1065307, 0.7182818]; mean
        ("k3", (math.exp(-0.5) - 0.5 + math.exp(1.0) - 2.0) / 2),
    ],
)
def test_kl_estimators_hand_computed(estimator: str, expected_kl: float):
    logprobs = torch.tensor([[-1.0, -2.0]], dtype=F64, requires_grad=True)
    batch = make_policy_batch(
        logprobs.detach().clone(),
        advantages=torch.zeros(1, dtype=F64),
        reference_logprobs=torch.tensor([[-1.5, -1.0]], dtype=F64),
    )
    loss, metrics = make_loss(kl_beta=0.1, kl_estimator=estimator)(logprobs, batch, global_denominator=2)
    # A = 0 -> pg_loss 0; loss = 0.1 * sum(KL) / 2
    assert metrics["pg_loss"] == 0.0
    assert metrics["kl"] == pytest.approx(expected_kl, abs=1e-12)
    assert loss.item() == pytest.approx(0.1 * expected_kl, abs=1e-12)
    # approx_entropy = mean(-lp) = (1 + 2) / 2
    assert metrics["approx_entropy"] == pytest.approx(1.5, abs=1e-12)


def test_kl_needs_reference_logprobs():
    logprobs = torch.zeros(1, 2, dtype=F64)
    batch = make_policy_batch(logprobs.clone())
    with pytest.raises(ValueError, match="'reference_logprobs'"):
        make_loss(kl_beta=0.1)(logprobs, batch, global_denominator=2)
    # kl_beta = 0 does not need it, and reports kl = 0
    _, metrics = make_loss(kl_beta=0.0)(logprobs, batch, global_denominator=2)
    assert metrics["kl"] == 0.0 and metrics["kl_loss"] == 0.0


def test_truncated_importance_sampling_weights_and_prob_error():
    generation_logprobs = torch.full((1, 2), -1.0, dtype=F64)
    # pi_old / pi_gen = [0.5, 3.0]
    old_logprobs = generation_logprobs + torch.tensor([[0.5, 3.0]], dtype=F64).log()
    batch = make_policy_batch(old_logprobs, generation_logprobs=generation_logprobs)
    logprobs = old_logprobs.clone().requires_grad_()
    loss, metrics = make_loss(importance_sampling=True, is_truncation=2.0)(logprobs, batch, global_denominator=2)
    loss.backward()
    # w = min([0.5, 3.0], 2) = [0.5, 2.0]; r = 1, A = 1 -> loss = -(0.5 + 2.0) / 2 = -1.25
    assert loss.item() == pytest.approx(-1.25, abs=1e-12)
    # grad = -A r w / D = [-0.25, -1.0]
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.25, -1.0]], dtype=F64), rtol=0, atol=1e-12)
    assert metrics["tis_weight_mean"] == pytest.approx(1.25, abs=1e-12)
    # mean(exp(|gen - old|)) = (exp(|log 0.5|) + exp(log 3)) / 2 = (2 + 3) / 2
    assert metrics["token_mult_prob_error"] == pytest.approx(2.5, abs=1e-12)
    # without TIS: loss = -(1 + 1) / 2
    loss, metrics = make_loss(importance_sampling=False)(logprobs, batch, global_denominator=2)
    assert loss.item() == pytest.approx(-1.0, abs=1e-12) and metrics["tis_weight_mean"] == 1.0


def _ratios_example() -> tuple[Batch, torch.Tensor]:
    """Two sequences of three tokens, pi_old / pi_gen = [0.5, 3.0, 1.0] and [0.4, 0.5, 1.0], A = 1, r = 1."""
    generation_logprobs = torch.full((2, 3), -1.0, dtype=F64)
    rho = torch.tensor([[0.5, 3.0, 1.0], [0.4, 0.5, 1.0]], dtype=F64)
    old_logprobs = generation_logprobs + rho.log()
    batch = make_policy_batch(old_logprobs, generation_logprobs=generation_logprobs)
    return batch, old_logprobs.clone().requires_grad_()


def test_icepop_masks_the_tokens_outside_the_band():
    batch, logprobs = _ratios_example()
    loss, metrics = make_loss(importance_sampling=True, is_type="icepop", is_lower_bound=0.45, is_truncation=2.0)(
        logprobs, batch, global_denominator=6)
    loss.backward()
    # band [0.45, 2]: 3.0 (too high) and 0.4 (too low) get 0; w = [[0.5, 0, 1], [0, 0.5, 1]]
    # loss = -sum(w) / 6 = -3 / 6; grad = -w / 6; every token stays in the normalizer
    assert loss.item() == pytest.approx(-0.5, abs=1e-12)
    torch.testing.assert_close(logprobs.grad, -torch.tensor([[0.5, 0, 1], [0, 0.5, 1]], dtype=F64) / 6)
    assert metrics["tis_weight_mean"] == pytest.approx(3 / 6, abs=1e-12)
    assert metrics["is_truncated_fraction"] == pytest.approx(2 / 6, abs=1e-12)
    assert metrics["is_masked_sequences"] == 0


def test_seq_mask_tis_masks_whole_sequences_by_their_geometric_mean():
    batch, logprobs = _ratios_example()
    loss, metrics = make_loss(importance_sampling=True, is_type="seq-mask-tis", is_lower_bound=0.7,
                              is_truncation=2.0)(logprobs, batch, global_denominator=6)
    loss.backward()
    # geometric means: (0.5 * 3 * 1)^(1/3) = 1.1447 (kept, weights untruncated: 3.0 stays 3.0);
    # (0.4 * 0.5 * 1)^(1/3) = 0.5848 < 0.7 (masked). loss = -(0.5 + 3 + 1) / 6 = -0.75
    assert (0.5 * 3.0) ** (1 / 3) > 0.7 > (0.4 * 0.5) ** (1 / 3)
    assert loss.item() == pytest.approx(-0.75, abs=1e-12)
    torch.testing.assert_close(logprobs.grad, -torch.tensor([[0.5, 3.0, 1.0], [0, 0, 0]], dtype=F64) / 6)
    assert metrics["is_masked_sequences"] == 1 and metrics["num_valid_sequences"] == 2
    assert metrics["is_truncated_fraction"] == pytest.approx(3 / 6, abs=1e-12)
    # a padded position does not enter the geometric mean: masking sequence 1's last token (rho 1) makes its
    # mean (0.4 * 0.5)^(1/2) = 0.447, still masked; unmasking the band's floor keeps it
    batch["response_mask"] = torch.tensor([[True, True, True], [True, True, False]])
    _, metrics = make_loss(importance_sampling=True, is_type="seq-mask-tis", is_lower_bound=0.44,
                           is_truncation=2.0)(logprobs.detach(), batch, global_denominator=5)
    assert metrics["is_masked_sequences"] == 0


def test_truncation_never_moves_a_zero_advantage_sample():
    """A weight multiplies the surrogate: a sample with A = 0 contributes exactly 0 loss and 0 gradient whatever
    its weight, so the trainer may leave it out of the passes (loss.skip_zero_advantage) with TIS on."""
    batch, logprobs = _ratios_example()
    batch["advantages"] = torch.tensor([0.0, 1.0], dtype=F64)
    for is_type in ("tis", "icepop", "seq-mask-tis"):
        leaf = logprobs.detach().clone().requires_grad_()
        loss_fn = make_loss(importance_sampling=True, is_type=is_type, is_lower_bound=0.3)
        loss, _ = loss_fn(leaf, batch, global_denominator=6)
        loss.backward()
        assert leaf.grad[0].abs().sum() == 0, is_type
        alone = leaf.detach()[1:].clone().requires_grad_()
        loss_alone, _ = loss_fn(alone, batch.select([1]), global_denominator=6)
        loss_alone.backward()
        assert loss.item() == pytest.approx(loss_alone.item(), abs=1e-12), is_type
        torch.testing.assert_close(leaf.grad[1:], alone.grad)


def test_importance_sampling_options_are_checked():
    with pytest.raises(ValueError, match="is_type"):
        make_loss(is_type="gspo")
    with pytest.raises(ValueError, match="is_lower_bound"):
        make_loss(is_lower_bound=3.0, is_truncation=2.0)


def test_without_old_logprobs_pi_old_is_the_trained_policy():
    """The trainer skips the pi_old pass for one on-policy optimizer step: the loss and its gradient are those of
    an explicit pi_old equal to the current logprobs, and token_mult_prob_error is still reported."""
    current = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], dtype=F64)
    generation = current + 0.1
    advantages = torch.tensor([1.0, -2.0], dtype=F64)
    explicit = make_policy_batch(current.clone(), generation_logprobs=generation, advantages=advantages)
    implicit = Batch({key: value for key, value in explicit.items() if key != "old_logprobs"})
    results = []
    for batch in (explicit, implicit):
        logprobs = current.clone().requires_grad_()
        loss, metrics = make_loss()(logprobs, batch, global_denominator=4)
        loss.backward()
        results.append((loss.item(), logprobs.grad, metrics))
    (loss_a, grad_a, metrics_a), (loss_b, grad_b, metrics_b) = results
    # r = 1: loss = -sum(A) over tokens / D = -(2 * 1 - 2 * 2) / 4 = 0.5; grad = -A / D
    assert loss_a == loss_b == pytest.approx(0.5, abs=1e-12)
    torch.testing.assert_close(grad_b, grad_a, rtol=0, atol=0)
    torch.testing.assert_close(grad_b, torch.tensor([[-0.25, -0.25], [0.5, 0.5]], dtype=F64))
    assert metrics_b["token_mult_prob_error"] == pytest.approx(math.exp(0.1), abs=1e-12) == metrics_a["token_mult_prob_error"]
    assert metrics_b["ratio_max"] == metrics_b["ratio_min"] == 1.0


def test_loss_weight_scales_correction_tokens_only():
    old_logprobs = torch.full((3, 1), -1.0, dtype=F64)
    batch = make_policy_batch(old_logprobs, sample_kind=["base", "correction", "correction"])
    logprobs = old_logprobs.clone().requires_grad_()
    loss, _ = make_loss(loss_weight=0.5)(logprobs, batch, global_denominator=3)
    loss.backward()
    # r = 1, A = 1: -(1 + 0.5 + 0.5) / 3 (all 3 tokens count in the shared denominator)
    assert loss.item() == pytest.approx(-2 / 3, abs=1e-12)
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1 / 3], [-1 / 6], [-1 / 6]], dtype=F64))
    loss, _ = make_loss(loss_weight=0.0)(logprobs, batch, global_denominator=3)
    assert loss.item() == pytest.approx(-1 / 3, abs=1e-12)


def test_constructor_rejects_unknown_options():
    with pytest.raises(ValueError, match="normalization"):
        make_loss(normalization="batch")
    with pytest.raises(ValueError, match="kl_estimator"):
        make_loss(kl_estimator="k2")
    with pytest.raises(ValueError, match="clip_low"):
        make_loss(clip_low=1.0)
    with pytest.raises(TypeError):
        PolicyLoss(0.2, 0.2, "token", 0.0, "k3", False, 2.0, 1.0)


# ----- global normalization: micro-batches and data-parallel shards add up to the full batch ------------


def random_policy_batch() -> tuple[Batch, torch.Tensor]:
    """8 samples in 4 groups, uneven masks (sample 1 has none), both streams, KL and TIS inputs."""
    generator = torch.Generator().manual_seed(1234)
    num_samples, width = 8, 6
    old_logprobs = -torch.rand(num_samples, width, generator=generator, dtype=F64) * 2
    response_mask = torch.rand(num_samples, width, generator=generator) < 0.6
    response_mask[1] = False
    response_mask[5] = True
    batch = Batch(
        {
            "group_id": torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]),
            "sample_kind": ["base", "correction"] * 4,
            "sample_index": torch.arange(num_samples),
            "response_mask": response_mask,
            "advantages": torch.randn(num_samples, generator=generator, dtype=F64),
            "old_logprobs": old_logprobs,
            "generation_logprobs": old_logprobs + 0.3 * torch.randn(num_samples, width, generator=generator, dtype=F64),
            "reference_logprobs": old_logprobs + 0.5 * torch.randn(num_samples, width, generator=generator, dtype=F64),
        }
    )
    logprobs = old_logprobs + 0.4 * torch.randn(num_samples, width, generator=generator, dtype=F64)
    return batch, logprobs


def joint_loss(normalization: str) -> PolicyLoss:
    return make_loss(
        normalization=normalization,
        clip_high=0.28,
        kl_beta=0.05,
        importance_sampling=True,
        is_truncation=1.2,
        loss_weight=0.7,
    )


def run_chunks(loss_fn: PolicyLoss, logprobs: torch.Tensor, chunks: list[Batch], denominator: int):
    """Accumulate gradients over `chunks` like a trainer; returns (summed loss, grad, metrics list)."""
    leaf = logprobs.clone().requires_grad_()
    total, metrics = 0.0, []
    for chunk in chunks:
        loss, chunk_metrics = loss_fn(leaf[chunk["sample_index"]], chunk, global_denominator=denominator)
        loss.backward()
        total += loss.item()
        metrics.append(chunk_metrics)
    return total, leaf.grad, metrics


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_micro_batches_and_shards_add_up_to_the_full_batch(normalization: str):
    batch, logprobs = random_policy_batch()
    loss_fn = joint_loss(normalization)
    full_loss, full_grad, (full_metrics,) = run_chunks(
        loss_fn, logprobs, [batch], loss_fn.local_denominator([batch])
    )
    # the example exercises both clip sides, the TIS cap and an empty sequence
    assert full_metrics["clip_fraction_low"] > 0 and full_metrics["clip_fraction_high"] > 0
    truncated = (batch["old_logprobs"] - batch["generation_logprobs"]).exp() > 1.2
    assert (truncated & batch["response_mask"]).any()

    micro_batches = batch.micro_batches(2)
    micro_loss, micro_grad, micro_metrics = run_chunks(
        loss_fn, logprobs, micro_batches, loss_fn.local_denominator(micro_batches)
    )
    torch.testing.assert_close(torch.tensor(micro_loss), torch.tensor(full_loss), rtol=0, atol=1e-12)
    torch.testing.assert_close(micro_grad, full_grad, rtol=0, atol=1e-12)
    aggregated = aggregate_metrics(micro_metrics)
    for name, value in full_metrics.items():
        assert aggregated[name] == pytest.approx(value, rel=1e-10, abs=1e-12), name

    # 2 data-parallel ranks x micro-batches of 2; D is the SUM of the ranks' local counts
    half = len(batch) // 2
    rank_chunks = [shard.micro_batches(2) for shard in (batch.slice(0, half), batch.slice(half, len(batch)))]
    global_denominator = sum(loss_fn.local_denominator(chunks) for chunks in rank_chunks)
    shard_loss, shard_grad, _ = run_chunks(
        loss_fn, logprobs, [chunk for chunks in rank_chunks for chunk in chunks], global_denominator
    )
    torch.testing.assert_close(torch.tensor(shard_loss), torch.tensor(full_loss), rtol=0, atol=1e-12)
    torch.testing.assert_close(shard_grad, full_grad, rtol=0, atol=1e-12)


def test_aggregate_metrics_rules():
    first = {"loss": 1.0, "ratio_min": 0.9, "ratio_max": 1.1, "kl": 0.2, "num_valid_tokens": 1.0}
    second = {"loss": 2.0, "ratio_min": 0.8, "ratio_max": 1.0, "kl": 0.5, "num_valid_tokens": 3.0}
    aggregated = aggregate_metrics([first, second])
    # sum, min, max, token-weighted mean (0.2 * 1 + 0.5 * 3) / 4 = 0.425
    assert aggregated == pytest.approx(
        {"loss": 3.0, "ratio_min": 0.8, "ratio_max": 1.1, "kl": 0.425, "num_valid_tokens": 4.0}
    )
