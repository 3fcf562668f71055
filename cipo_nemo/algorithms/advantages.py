"""Advantages: group-relative for the base stream (docs/design.md step 1), `correction_advantages` for the correction
stream (step 5).

Config keys: ``grpo.normalize_std`` (false = Dr.GRPO), ``grpo.leave_one_out`` (RLOO baseline), ``grpo.std_eps``;
``cipo.advantage_mode`` for corrections. Both take rewards already shaped once by `training_signal.py`, which is
where every reward change of a step happens.
"""

from __future__ import annotations

from typing import Literal

import torch

from cipo_nemo.algorithms.tensor_checks import check_rewards_and_groups, describe_value


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    normalize_std: bool = True,
    leave_one_out: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """One advantage per sample, relative to the other samples of its explicit group.

    Groups are given by `group_ids` (any integers, in any order); prompts are never compared.

    - Baseline: the group mean, or with ``leave_one_out`` the mean of the *other* samples of the
      group, b_i = (sum_g - r_i) / (n_g - 1) (RLOO, arXiv 2402.14740).
    - Scale (``normalize_std``): one std per group, the sample std with Bessel's correction over
      all n_g rewards of the group, std_g = sqrt(sum_g (r_j - mean_g)^2 / (n_g - 1)), the same in
      both baseline modes. This is ``torch.std`` as used by GRPO in TRL and verl, and equals
      NeMo-RL's std when the baseline is the plain mean. With the LOO baseline NeMo-RL instead
      uses a per-sample std of the n_g - 1 other rewards; we do not, because one scale per group
      keeps the group's advantages proportional to r_i - b_i. (With a per-sample scale, a single
      success among failures sees zero std in its "others" and keeps an unscaled advantage while
      its failures are scaled, which breaks the zero-sum of the group.)
    - Groups whose rewards are all equal (zero variance) and singleton groups get exactly 0.

    Args:
        rewards: floating tensor (N,).
        group_ids: integer tensor (N,).
        normalize_std: divide by std_g + eps (False gives Dr.GRPO's unscaled advantages).
        leave_one_out: use the leave-one-out baseline.
        eps: added to the std before dividing.

    Returns:
        Advantages (N,), same dtype and device as `rewards`.
    """
    _validate_inputs(rewards, group_ids, eps)
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    group_size = counts.to(rewards.dtype)[inverse]  # (N,) n_g of each sample's group
    group_sum = _sum_per_group(rewards, inverse, counts.numel())[inverse]
    group_mean = group_sum / group_size
    if leave_one_out:
        # b_i = (sum_g - r_i) / (n_g - 1); singletons are zeroed below, clamp only avoids 0/0
        baseline = (group_sum - rewards) / (group_size - 1).clamp(min=1)
    else:
        # b_i = mean_g
        baseline = group_mean
    advantages = rewards - baseline
    if normalize_std:
        squared_deviation = _sum_per_group((rewards - group_mean) ** 2, inverse, counts.numel())[inverse]
        # std_g = sqrt(sum_g (r_j - mean_g)^2 / (n_g - 1));  A_i = (r_i - b_i) / (std_g + eps)
        group_std = (squared_deviation / (group_size - 1).clamp(min=1)).sqrt()
        advantages = advantages / (group_std + eps)
    # rounding can leave ~1e-17 / (tiny std + eps) in constant groups, so zero them exactly
    constant_group = _is_constant_per_group(rewards, inverse, counts.numel())[inverse]
    return torch.where(constant_group, torch.zeros_like(advantages), advantages)


def _validate_inputs(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float) -> None:
    check_rewards_and_groups(rewards, group_ids)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def _sum_per_group(values: torch.Tensor, inverse: torch.Tensor, num_groups: int) -> torch.Tensor:
    return values.new_zeros(num_groups).index_add_(0, inverse, values)


def _is_constant_per_group(values: torch.Tensor, inverse: torch.Tensor, num_groups: int) -> torch.Tensor:
    group_min = values.new_zeros(num_groups).scatter_reduce_(0, inverse, values, "amin", include_self=False)
    group_max = values.new_zeros(num_groups).scatter_reduce_(0, inverse, values, "amax", include_self=False)
    return group_min == group_max


# ----- the correction stream (docs/design.md step 5) ---------------------------------------------------------------

CorrectionAdvantageMode = Literal["stream", "anchor", "group"]


def correction_advantages(
    shaped_rewards: torch.Tensor,
    group_ids: torch.Tensor,
    anchor_correct: torch.Tensor,
    *,
    mode: CorrectionAdvantageMode,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Advantages of correction samples (`cipo.advantage_mode`) from their shaped rewards r~ (the risk penalty
    already applied, once, by `training_signal.shape_rewards`).

    A correction group shares one anchor, so the shaped reward r~ = r - lambda * 1[anchor right, r wrong] is
    (1 + lambda * a) r - lambda * a with a = 1[anchor right]: any baseline that does not depend on the sampled
    correction can only weight retention contexts (a = 1) by (1 + lambda) against fix contexts (a = 0).

    - ``stream``: d_j = r~_j - mean over j's group of r~, divided by ONE scale for the whole correction stream,
      sigma_C = sqrt(mean of d_j^2 over the samples of groups with some d_j != 0). Retention groups get exactly
      (1 + lambda) times the advantages they would get without the penalty; constant groups get 0.
    - ``anchor``: the anchor's own reward as the baseline (SCoRe-style progress, arXiv 2409.12917),
      d_j = r~_j - r(anchor), with the same stream-wide scale: kept 0, broken -(1 + lambda), fixed +1,
      unfixed 0 (before scaling). A group that breaks its right anchor every time still gets a signal.
    - ``group``: per-group std normalization of r~ (the first design). The penalty is an affine map of each
      group's rewards and this normalization cancels it: lambda_risk is inert here (kept for ablations).

    Args:
        shaped_rewards: r~ (N,) of the correction samples, floating.
        group_ids: correction group of each sample (N,), integer.
        anchor_correct: bool (N,), the verdict on each sample's anchor (constant within a group).
        mode: stream | anchor | group.
        eps: added to the scale before dividing.

    Returns:
        Advantages (N,), same dtype and device as `shaped_rewards`.
    """
    shaped = shaped_rewards
    _validate_inputs(shaped, group_ids, eps)
    if not isinstance(anchor_correct, torch.Tensor) or anchor_correct.dtype != torch.bool:
        raise TypeError(f"anchor_correct must be a bool tensor, got {describe_value(anchor_correct)}")
    if anchor_correct.shape != shaped.shape:
        raise ValueError(f"anchor_correct has shape {tuple(anchor_correct.shape)}, rewards {tuple(shaped.shape)}")
    if mode == "group":
        return group_advantages(shaped, group_ids, normalize_std=True, eps=eps)
    if mode == "stream":
        _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
        group_mean = _sum_per_group(shaped, inverse, counts.numel())[inverse] / counts.to(shaped.dtype)[inverse]
        deviation = shaped - group_mean  # d_j = r~_j - mean_g(r~)
        deviation = torch.where(_is_constant_per_group(shaped, inverse, counts.numel())[inverse],
                                torch.zeros_like(deviation), deviation)
    elif mode == "anchor":
        deviation = shaped - anchor_correct.to(shaped.dtype)  # d_j = r~_j - r(anchor), r(anchor) = 1[anchor correct]
    else:
        raise ValueError(f"mode must be 'stream', 'anchor' or 'group', got {mode!r}")
    scale = _stream_scale(deviation, group_ids)
    if scale is None:  # no group carries any signal: every advantage is exactly 0
        return torch.zeros_like(deviation)
    return deviation / (scale + eps)  # A_j = d_j / (sigma_C + eps)


def _stream_scale(deviation: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor | None:
    """sigma_C = sqrt(mean of d_j^2 over the samples of groups whose d is not all zero); None when there are none."""
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    group_signal = _sum_per_group(deviation.abs(), inverse, counts.numel())[inverse] > 0
    if not bool(group_signal.any()):
        return None
    return deviation[group_signal].pow(2).mean().sqrt()
