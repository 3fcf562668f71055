"""What counts as a success, shared by anchor selection, risk shaping, metrics and evaluation."""

from __future__ import annotations

import torch

SUCCESS_THRESHOLD = 0.5  # a rollout is successful when its reward > 0.5 (verifier rewards are in {0, 1})


def is_success(rewards: torch.Tensor) -> torch.Tensor:
    """Bool tensor: reward > SUCCESS_THRESHOLD, elementwise."""
    return rewards > SUCCESS_THRESHOLD
