"""Group-relative advantages (DESIGN step 1 for the base stream, step 5 for corrections).

Config keys: ``grpo.normalize_std`` (false = Dr.GRPO), ``grpo.leave_one_out`` (RLOO
baseline), ``grpo.std_eps``.
"""

from __future__ import annotations

import torch

from cipo_nemo.algorithms.tensor_checks import check_rewards_and_groups


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
