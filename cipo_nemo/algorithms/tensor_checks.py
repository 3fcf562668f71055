"""Argument checks for tensors that callers outside the config build (batches, rewards, group ids).

Config-derived values (rho bounds, windows, penalties) are validated once by the schema, not here.
"""

from __future__ import annotations

import torch

INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def describe_value(value: object) -> str:
    """'tensor of shape (N,) and dtype ...' or the type name, for error messages."""
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__


def check_rewards_and_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> None:
    """rewards: floating (N,); group_ids: integer (N,), same device."""
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor (N,), got {describe_value(rewards)}")
    if not rewards.dtype.is_floating_point:
        raise TypeError(f"rewards must be a floating tensor, got dtype {rewards.dtype}")
    if not isinstance(group_ids, torch.Tensor) or group_ids.dtype not in INTEGER_DTYPES:
        raise TypeError(f"group_ids must be an integer tensor, got {describe_value(group_ids)}")
    if group_ids.shape != rewards.shape:
        raise ValueError(f"rewards has {rewards.shape[0]} entries but group_ids has {group_ids.shape[0] if group_ids.dim() else 0}")
    if rewards.device != group_ids.device:
        raise ValueError(f"rewards are on {rewards.device} but group_ids are on {group_ids.device}")
