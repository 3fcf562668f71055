import math

import pytest
import torch

from cipo_nemo.algorithms.advantages import correction_advantages, group_advantages
from cipo_nemo.algorithms.correction import shape_correction_rewards

# Non-contiguous group ids, interleaved:
#   group 7 at samples 0, 2, 4, 5 with rewards [1, 0, 0, 0]
#   group 3 at samples 1, 3       with rewards [0, 1]
#   group 9 at sample 6 (singleton), group 4 at samples 7..9 with constant rewards 0.1
GROUP_IDS = torch.tensor([7, 3, 7, 3, 7, 7, 9, 4, 4, 4])
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.1, 0.1, 0.1], dtype=torch.float64)
SQRT_HALF = math.sqrt(0.5)

# group 7: mean 0.25, sample std sqrt((0.75^2 + 3 * 0.25^2) / 3) = sqrt(0.25) = 0.5
#          LOO baselines: (1 - 1) / 3 = 0 for the success, (1 - 0) / 3 = 1/3 for each failure
# group 3: mean 0.5, sample std sqrt((0.5^2 + 0.5^2) / 1) = sqrt(0.5); LOO baselines: 1 and 0
EXPECTED = {
    # (normalize_std, leave_one_out): advantages
    (False, False): [0.75, -0.5, -0.25, 0.5, -0.25, -0.25, 0, 0, 0, 0],
    # 0.75 / 0.5 = 1.5, -0.25 / 0.5 = -0.5; +-0.5 / sqrt(0.5) = +-sqrt(0.5)
    (True, False): [1.5, -SQRT_HALF, -0.5, SQRT_HALF, -0.5, -0.5, 0, 0, 0, 0],
    # 1 - 0 = 1, 0 - 1/3 = -1/3; group 3: 0 - 1 = -1, 1 - 0 = 1
    (False, True): [1.0, -1.0, -1 / 3, 1.0, -1 / 3, -1 / 3, 0, 0, 0, 0],
    # 1 / 0.5 = 2, (-1/3) / 0.5 = -2/3; +-1 / sqrt(0.5) = +-sqrt(2)
    (True, True): [2.0, -math.sqrt(2), -2 / 3, math.sqrt(2), -2 / 3, -2 / 3, 0, 0, 0, 0],
}


@pytest.mark.parametrize(("normalize_std", "leave_one_out"), list(EXPECTED))
def test_hand_computed_values(normalize_std: bool, leave_one_out: bool):
    advantages = group_advantages(
        REWARDS, GROUP_IDS, normalize_std=normalize_std, leave_one_out=leave_one_out, eps=0.0
    )
    expected = torch.tensor(EXPECTED[(normalize_std, leave_one_out)], dtype=torch.float64)
    torch.testing.assert_close(advantages, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("normalize_std", "leave_one_out"), list(EXPECTED))
def test_constant_and_singleton_groups_are_exactly_zero(normalize_std, leave_one_out, dtype):
    # 0.1 is not exact in binary: in float64 r - mean_g = -1.4e-17 and std_g ~ 0,
    # which gives -1.4e-11 instead of 0 without the explicit zeroing
    advantages = group_advantages(
        REWARDS.to(dtype), GROUP_IDS, normalize_std=normalize_std, leave_one_out=leave_one_out
    )
    assert torch.equal(advantages[6:], torch.zeros(4, dtype=dtype))
    assert advantages.dtype == dtype


def test_eps_is_added_to_std():
    advantages = group_advantages(REWARDS, GROUP_IDS, eps=0.1)
    # group 7 success: 0.75 / (0.5 + 0.1) = 1.25
    assert advantages[0].item() == pytest.approx(1.25, abs=1e-12)


@pytest.mark.parametrize(("normalize_std", "leave_one_out"), list(EXPECTED))
def test_independent_of_sample_order(normalize_std: bool, leave_one_out: bool):
    generator = torch.Generator().manual_seed(0)
    rewards = torch.rand(40, generator=generator, dtype=torch.float64)
    group_ids = torch.randint(0, 6, (40,), generator=generator) * 5 + 2
    permutation = torch.randperm(40, generator=generator)
    options = {"normalize_std": normalize_std, "leave_one_out": leave_one_out}
    original = group_advantages(rewards, group_ids, **options)
    permuted = group_advantages(rewards[permutation], group_ids[permutation], **options)
    torch.testing.assert_close(permuted, original[permutation], rtol=0, atol=1e-12)


def test_input_validation():
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="3 entries but group_ids has 2"):
        group_advantages(torch.zeros(3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="group_ids must be an integer"):
        group_advantages(torch.zeros(2), torch.zeros(2))
    with pytest.raises(TypeError, match="rewards must be a floating"):
        group_advantages(torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="eps"):
        group_advantages(torch.zeros(2), torch.zeros(2, dtype=torch.long), eps=-1.0)


def test_risk_penalty_is_cancelled_by_group_std_normalization_only():
    # a correction group of one correct anchor: r~ = r - lambda_risk * [r == 0] = r (1 + lambda) - lambda
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0])
    shaped = rewards - 1.0 * (rewards == 0)
    groups = torch.zeros(5, dtype=torch.long)
    assert torch.allclose(group_advantages(shaped, groups), group_advantages(rewards, groups), atol=1e-5)
    # without std normalization the penalty scales the group's advantages by (1 + lambda)
    unscaled, plain = (group_advantages(r, groups, normalize_std=False) for r in (shaped, rewards))
    assert torch.allclose(unscaled, 2.0 * plain)


# ----- correction_advantages ------------------------------------------------------------------------------------

# Two correction groups of 4: group 0 corrects a right anchor (retention), group 1 a wrong one (fix).
CORRECTION_REWARDS = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
CORRECTION_GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
ANCHOR_RIGHT = torch.tensor([True] * 4 + [False] * 4)


def _corr(mode: str, risk_penalty: float, rewards=CORRECTION_REWARDS, groups=CORRECTION_GROUPS, anchors=ANCHOR_RIGHT):
    shaped = shape_correction_rewards(rewards, anchors, risk_penalty)
    return correction_advantages(shaped, groups, anchors, mode=mode, eps=0.0)


@pytest.mark.parametrize("penalty", [0.5, 1.0, 3.0])
def test_stream_mode_weights_retention_groups_by_one_plus_lambda(penalty):
    plain, shaped = _corr("stream", 0.0), _corr("stream", penalty)
    retention, fix = ANCHOR_RIGHT, ~ANCHOR_RIGHT
    # deviations: retention (1 + lambda) * (r - mean), fix (r - mean); one scale for both groups
    ratio_retention_to_fix = shaped[retention].abs().max() / shaped[fix].abs().max()
    assert ratio_retention_to_fix.item() == pytest.approx((1 + penalty) * plain[retention].abs().max().item()
                                                         / plain[fix].abs().max().item())
    # by hand: d = [+(1+l)/2, -(1+l)/2, +(1+l)/2, -(1+l)/2, 3/4, -1/4, -1/4, -1/4]
    d = torch.tensor([(1 + penalty) / 2, -(1 + penalty) / 2] * 2 + [0.75, -0.25, -0.25, -0.25], dtype=torch.float64)
    torch.testing.assert_close(shaped, d / d.pow(2).mean().sqrt())
    # the penalty changes the stream's advantages (it was inert under per-group std)
    assert not torch.allclose(shaped, plain)


def test_group_mode_is_unchanged_by_the_penalty():
    torch.testing.assert_close(_corr("group", 0.0), _corr("group", 2.0), atol=1e-9, rtol=0)


def test_anchor_mode_four_cases():
    # one sample per case, each in its own group: kept (right->right), broken (right->wrong),
    # fixed (wrong->right), unfixed (wrong->wrong)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    anchors = torch.tensor([True, True, False, False])
    groups = torch.arange(4)
    advantages = _corr("anchor", 1.0, rewards=rewards, groups=groups, anchors=anchors)
    # d = [0, -(1 + 1), +1, 0]; sigma over groups with signal = sqrt((4 + 1) / 2)
    expected = torch.tensor([0.0, -2.0, 1.0, 0.0], dtype=torch.float64) / (2.5 ** 0.5)
    torch.testing.assert_close(advantages, expected)
    assert advantages[0] == 0 and advantages[3] == 0 and advantages[1] < 0 < advantages[2]
    # a broken anchor costs (1 + lambda) times a fix
    assert (-advantages[1] / advantages[2]).item() == pytest.approx(2.0)


def test_anchor_mode_gives_signal_when_every_correction_breaks_a_right_anchor():
    rewards = torch.zeros(4, dtype=torch.float64)
    advantages = _corr("anchor", 1.0, rewards=rewards, groups=torch.zeros(4, dtype=torch.long),
                       anchors=torch.ones(4, dtype=torch.bool))
    assert (advantages < 0).all()
    # stream mode has nothing to compare within that group
    assert (_corr("stream", 1.0, rewards=rewards, groups=torch.zeros(4, dtype=torch.long),
                  anchors=torch.ones(4, dtype=torch.bool)) == 0).all()


@pytest.mark.parametrize("mode", ["stream", "anchor", "group"])
def test_constant_groups_get_zero(mode):
    # group 0: a right anchor kept by every correction; group 1: a wrong anchor never fixed
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1])
    anchors = torch.tensor([True, True, False, False])
    assert (_corr(mode, 1.0, rewards=rewards, groups=groups, anchors=anchors) == 0).all()


def test_correction_advantages_reject_bad_inputs():
    with pytest.raises(ValueError, match="mode"):
        _corr("median", 1.0)
    with pytest.raises(TypeError, match="anchor_correct must be a bool"):
        correction_advantages(CORRECTION_REWARDS, CORRECTION_GROUPS, ANCHOR_RIGHT.long(), mode="stream")
    with pytest.raises(ValueError, match="anchor_correct has shape"):
        correction_advantages(CORRECTION_REWARDS, CORRECTION_GROUPS, ANCHOR_RIGHT[:3], mode="stream")
    with pytest.raises(ValueError, match="entries but group_ids"):
        correction_advantages(CORRECTION_REWARDS, CORRECTION_GROUPS[:3], ANCHOR_RIGHT, mode="stream")
