"""A step's math in one place: verifier rewards -> shaped rewards -> advantages -> what carries gradient.

    r~ = r - lambda_risk * 1[correction of a right anchor, r wrong]           (corrections; docs/design.md step 5)
           - factor * clamp(length - (max_new_tokens - buffer), 0) / buffer   (both streams, grpo.overlong_buffer)
    A  = group_advantages(r~) per prompt group (base; step 1) | correction_advantages(r~) (corrections; step 5)
    responses cut at max_new_tokens leave the loss and its normalizer        (grpo.mask_truncated)

`training_signal` applies each of these exactly once per step and writes the result into the joint batch
(`shaped_rewards`, `advantages`, the masked `response_mask`); the sample dump and the trainer read them from
there. `carries_gradient` says which samples the train and pi_old passes need at all (loss.skip_zero_advantage).
"""

from __future__ import annotations

import torch

from cipo_nemo.algorithms.advantages import correction_advantages, group_advantages
from cipo_nemo.algorithms.correction import shape_correction_rewards
from cipo_nemo.config.schema import CorrectionConfig, GRPOConfig
from cipo_nemo.data.batch import Batch

TRUNCATED = "length"  # the finish_reason of a response cut at max_new_tokens


def overlong_penalty(lengths: torch.Tensor, *, max_new_tokens: int, buffer: int, factor: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), as a non-negative amount to subtract:
    factor * clamp(length - (max_new_tokens - buffer), 0, buffer) / buffer; 0 everywhere when buffer is 0."""
    if buffer == 0:
        return torch.zeros(lengths.shape, dtype=torch.float32)
    over = (lengths.float() - (max_new_tokens - buffer)).clamp(min=0.0, max=float(buffer))
    return factor * over / buffer


def shape_rewards(batch: Batch, *, grpo: GRPOConfig, cipo: CorrectionConfig, max_new_tokens: int) -> torch.Tensor:
    """r~ of every sample of the joint batch (`correction.join_streams`): the risk penalty on corrections, the
    overlong punishment on both streams. The verifier `rewards` are not changed (success is judged on them)."""
    rewards = batch["rewards"]
    is_correction = _correction_samples(batch)
    anchor_correct = batch["anchor_correct"] & is_correction  # base samples quote no anchor
    shaped = shape_correction_rewards(rewards, anchor_correct, cipo.risk_penalty)
    lengths = batch["response_mask"].sum(dim=1)
    penalty = overlong_penalty(lengths, max_new_tokens=max_new_tokens, buffer=grpo.overlong_buffer,
                               factor=grpo.overlong_penalty_factor)
    return shaped - penalty.to(shaped.dtype)


def base_advantages(shaped_rewards: torch.Tensor, group_ids: torch.Tensor, *, grpo: GRPOConfig) -> torch.Tensor:
    """GRPO advantages of base samples: A = (r~ - mean_group) / (std_group + eps) per explicit group."""
    return group_advantages(shaped_rewards, group_ids, normalize_std=grpo.normalize_std,
                            leave_one_out=grpo.leave_one_out, eps=grpo.std_eps)


def training_signal(batch: Batch, *, grpo: GRPOConfig, cipo: CorrectionConfig, max_new_tokens: int) -> Batch:
    """The joint batch with `shaped_rewards` and `advantages` of both streams, and, with grpo.mask_truncated, the
    response_mask of truncated responses cleared (they still count in their group's baseline, as in DAPO's overlong
    filtering, but leave the loss and its normalizer). A new batch; the caller's is not changed."""
    out = Batch(dict(batch.items()))
    shaped = shape_rewards(batch, grpo=grpo, cipo=cipo, max_new_tokens=max_new_tokens)
    is_correction = _correction_samples(batch)
    advantages = torch.zeros_like(shaped)
    base = ~is_correction
    advantages[base] = base_advantages(shaped[base], batch["group_id"][base], grpo=grpo)
    if bool(is_correction.any()):
        advantages[is_correction] = correction_advantages(
            shaped[is_correction], batch["group_id"][is_correction], batch["anchor_correct"][is_correction],
            mode=cipo.advantage_mode, eps=grpo.std_eps)
    out["shaped_rewards"] = shaped
    out["advantages"] = advantages
    if grpo.mask_truncated:
        truncated = torch.tensor([reason == TRUNCATED for reason in batch["finish_reason"]], dtype=torch.bool)
        out["response_mask"] = batch["response_mask"] & ~truncated[:, None].to(batch["response_mask"].device)
    return out


def carries_gradient(batch: Batch) -> torch.Tensor:
    """Bool (N,): samples with a non-zero advantage and at least one trained token. With no loss term that is
    non-zero at A = 0 (no KL to the reference; our loss has no entropy bonus), the clipped surrogate
    -min(r A, clip(r) A) of every other sample is exactly 0 whatever the ratio, and so is its gradient."""
    advantages = batch["advantages"]
    nonzero = advantages != 0 if advantages.dim() == 1 else (advantages != 0).any(dim=1)
    return nonzero.cpu() & batch["response_mask"].any(dim=1).cpu()


def correction_groups_live(batch: Batch) -> float | None:
    """Share of this step's correction groups with a non-zero advantage somewhere, i.e. that send a gradient
    (a group whose shaped rewards are all equal trains nothing); None without a correction stream."""
    groups = [indices for indices in batch.group_indices().values() if batch["sample_kind"][indices[0]] == "correction"]
    if not groups:
        return None
    return sum(bool(batch["advantages"][indices].abs().gt(0).any()) for indices in groups) / len(groups)


def _correction_samples(batch: Batch) -> torch.Tensor:
    return torch.tensor([kind == "correction" for kind in batch["sample_kind"]], dtype=torch.bool)
