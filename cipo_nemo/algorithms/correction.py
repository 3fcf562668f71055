"""The correction stream's risk shaping and the joint batch (docs/design.md steps 4-5).

- `shape_correction_rewards`: risk-averse shaping, r~ = r - lambda_risk * 1[anchor correct and correction wrong]
  (applied once per step, by `training_signal.shape_rewards`).
- `join_streams`: one batch from a step's base and correction rollouts, plus the correction stream's metrics.

Anchor selection lives in `anchors.py`, the rho controller in `rho.py`, the prompt text in
`cipo_nemo/data/correction_prompts.py`, the step's shaped rewards and advantages in `training_signal.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cipo_nemo.algorithms.anchors import AnchorSelection
from cipo_nemo.algorithms.rewards import is_success
from cipo_nemo.algorithms.tensor_checks import INTEGER_DTYPES, describe_value
from cipo_nemo.data.batch import Batch

def shape_correction_rewards(rewards: torch.Tensor, anchor_correct: torch.Tensor, risk_penalty: float) -> torch.Tensor:
    """Penalize breaking a correct anchor: r~ = r - risk_penalty * 1[anchor correct and r not successful]; a new tensor.

    "Correct" and "wrong" use the one SUCCESS_THRESHOLD that anchor selection uses (reward > 0.5 is a success),
    so that a partial reward is never counted as success for the anchor and as failure for the correction."""
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1 or not rewards.is_floating_point():
        raise ValueError(f"rewards must be a 1-D floating tensor (N,), got {describe_value(rewards)}")
    if not isinstance(anchor_correct, torch.Tensor) or anchor_correct.shape != rewards.shape:
        expected = tuple(rewards.shape)
        raise ValueError(f"anchor_correct must be a tensor of shape {expected}, got {describe_value(anchor_correct)}")
    broken = anchor_correct.to(torch.bool) & ~is_success(rewards)
    return rewards - risk_penalty * broken.to(rewards.dtype)  # r~ = r - lambda_risk * 1[correct anchor, wrong correction]


@dataclass(frozen=True)
class CorrectionMetrics:
    """Per-step correction-stream metrics. Rates are None when nothing was there to measure.

    correction_success: mean raw reward of corrections of failed anchors (wrong -> right).
    retention: mean raw reward of corrections of successful anchors (right -> right); feeds `RhoController`.
    """

    anchors_total: int
    anchors_successful: int
    anchors_failed: int
    anchors_in_window: int
    anchors_fallback: int
    anchors_truncated: int
    correction_samples: int
    correction_reward_mean: float | None
    correction_success: float | None
    retention: float | None
    rho: float

    def as_dict(self, prefix: str = "cipo/") -> dict[str, float | None]:
        """Metric name -> value for loggers; a rate with nothing to measure stays None (logged as null), so every
        step has the same keys."""
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return {f"{prefix}{name}": None if value is None else float(value) for name, value in values.items()}


def join_streams(
    base: Batch,
    corrections: Batch | None,
    *,
    anchors: AnchorSelection | None,
    rho: float,
) -> tuple[Batch, CorrectionMetrics]:
    """Join a step's base rollouts and correction rollouts into one batch (rewards are not changed here:
    `training_signal` shapes them).

    `base`: ``sample_kind`` all "base", verifier ``rewards``. `corrections` (None for GRPO or a step without
    anchors): ``sample_kind`` all "correction", verifier ``rewards``, local ``group_id`` (one group per
    correction prompt) and ``anchor_index`` (position in ``anchors.indices`` of the anchor it corrects).

    The result holds every sample with its verifier ``rewards``, ``anchor_index`` (long; -1 for base samples,
    also without corrections, so GRPO and CIPO batches have the same keys) and ``anchor_correct`` (bool; the
    verdict on each correction's anchor, False for base samples). Correction group ids are shifted to
    max(base id) + 1 + local id, disjoint from the base ids. Token tensors of different length T are right-padded
    by `Batch.concat` (masks with False, so the padding is never trained). `rho` is the share used to select this
    step's anchors; it is only reported.
    """
    _validate_base(base)
    base = Batch(dict(base.items()))  # a shallow copy: the caller's batch keeps its keys
    base["anchor_index"] = torch.full((len(base),), -1, dtype=torch.long, device=base["group_id"].device)
    base["anchor_correct"] = torch.zeros(len(base), dtype=torch.bool, device=base["group_id"].device)
    if corrections is None:
        return base, _metrics(anchors, None, None, rho)
    if anchors is None:
        raise ValueError("corrections were given without the AnchorSelection they correct (anchors=None)")
    _validate_corrections(corrections, num_anchors=len(anchors))
    anchor_index = corrections["anchor_index"].long()
    anchor_correct = torch.tensor(anchors.anchor_correct, dtype=torch.bool, device=anchor_index.device)[anchor_index]
    shifted = Batch(dict(corrections.items()))
    offset = int(base["group_id"].max().item()) + 1 if len(base) else 0  # new id = max base id + 1 + local id
    shifted["group_id"] = (corrections["group_id"] + offset).to(base["group_id"].dtype)
    shifted["anchor_index"] = anchor_index
    shifted["anchor_correct"] = anchor_correct
    merged = Batch.concat([base, shifted])
    return merged, _metrics(anchors, corrections["rewards"], anchor_correct, rho)


def _metrics(
    anchors: AnchorSelection | None,
    correction_rewards: torch.Tensor | None,
    anchor_correct: torch.Tensor | None,
    rho: float,
) -> CorrectionMetrics:
    anchors = anchors or AnchorSelection(indices=[], anchor_correct=[], in_window=[], prompt_accuracy={})
    has_corrections = correction_rewards is not None and anchor_correct is not None
    return CorrectionMetrics(
        anchors_total=len(anchors),
        anchors_successful=anchors.num_successful,
        anchors_failed=anchors.num_failed,
        anchors_in_window=anchors.num_in_window,
        anchors_fallback=anchors.num_fallback,
        anchors_truncated=anchors.num_truncated,
        correction_samples=len(correction_rewards) if has_corrections else 0,
        correction_reward_mean=_mean_or_none(correction_rewards) if has_corrections else None,
        correction_success=_mean_or_none(correction_rewards[~anchor_correct]) if has_corrections else None,
        retention=_mean_or_none(correction_rewards[anchor_correct]) if has_corrections else None,
        rho=float(rho),
    )


def _mean_or_none(values: torch.Tensor) -> float | None:
    return float(values.double().mean().item()) if values.numel() else None


def _validate_base(base: Batch) -> None:
    if "rewards" not in base:
        raise ValueError(f"the base batch needs 'rewards'; keys: {list(base.keys())}")
    kinds = sorted(set(base["sample_kind"]) - {"base"})
    if kinds:
        raise ValueError(f"the base batch holds samples of kind {kinds}; every sample_kind must be 'base'")


def _validate_corrections(corrections: Batch, *, num_anchors: int) -> None:
    missing = [key for key in ("rewards", "anchor_index") if key not in corrections]
    if missing:
        raise ValueError(f"the correction batch lacks {missing}; keys: {list(corrections.keys())}")
    kinds = sorted(set(corrections["sample_kind"]) - {"correction"})
    if kinds:
        raise ValueError(f"the correction batch holds samples of kind {kinds}; every sample_kind must be 'correction'")
    anchor_index = corrections["anchor_index"]
    if not isinstance(anchor_index, torch.Tensor) or anchor_index.dtype not in INTEGER_DTYPES:
        raise TypeError(f"anchor_index must be an integer tensor, got {describe_value(anchor_index)}")
    out_of_range = sorted({i for i in anchor_index.tolist() if not 0 <= i < num_anchors})
    if out_of_range:
        raise ValueError(f"anchor_index values {out_of_range} are out of range for {num_anchors} anchors")
    if len(corrections) and int(corrections["group_id"].min().item()) < 0:
        raise ValueError("correction group ids must be local ids >= 0 (one group per correction prompt)")
    for group, members in corrections.group_indices().items():
        if len({anchor_index[i].item() for i in members}) > 1:
            raise ValueError(f"correction group {group} mixes samples of different anchors; one group per anchor")
