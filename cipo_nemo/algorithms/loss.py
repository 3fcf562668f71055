"""Clipped policy-gradient loss shared by the base and correction streams (docs/design.md step 6).

    L = sum_t w_t * l_t / D  +  beta * sum_t KL_t / D
    l_t = -min(r_t A, clip(r_t, 1 - clip_low, 1 + clip_high) A),   r_t = pi_theta / pi_old

PPO clipping (arXiv 1707.06347) with DAPO's separate low/high bounds (clip-higher, arXiv
2503.14476). w_t multiplies the correction stream by lambda_c and, optionally, applies truncated
importance sampling between the sampler and the trainer (TIS, or IcePop's token mask / NeMo-RL's
seq-mask-tis sequence mask: ``loss.is_type``). D is a *global* count: valid tokens
(``loss.normalization: token``, DAPO) or valid sequences (``sequence``, where each sequence first
takes the mean over its tokens, as in the original GRPO). Config keys: ``loss.clip_low``,
``loss.clip_high``, ``loss.normalization``, ``loss.kl_beta``, ``loss.kl_estimator``,
``loss.importance_sampling``, ``loss.is_truncation``, ``loss.is_type``, ``loss.is_lower_bound`` and the
correction stream's weight.

Global normalization: the trainer counts D over *all* micro-batches of *all* data-parallel
ranks (each rank calls `PolicyLoss.local_denominator` on its micro-batches, then the counts are
all-reduced with SUM) and passes the same D to every micro-batch call. Each micro-batch loss is
then its share of the full-batch loss: the micro-batch losses (and their gradients) add up to the
loss of the whole global batch, whatever the micro-batch size or data-parallel size. Base and
correction samples share this one D.

Logprob convention: ``logprobs[:, t] = log pi(input_ids[:, t] | input_ids[:, <t])``, aligned with
``generation_logprobs``; only positions where ``response_mask`` is True enter the loss.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeAlias

import torch

from cipo_nemo.data.batch import Batch

if TYPE_CHECKING:  # an annotation only: the loss module loads without the config (pydantic) at run time
    from cipo_nemo.config import MasterConfig

Normalization: TypeAlias = Literal["token", "sequence"]
KLEstimator: TypeAlias = Literal["k1", "k3"]
ImportanceSamplingType: TypeAlias = Literal["tis", "icepop", "seq-mask-tis"]

# How `aggregate_metrics` combines per-micro-batch metrics; every other key is a mean over valid
# tokens, combined as a mean weighted by num_valid_tokens. COUNT_METRICS add up over optimizer steps too.
COUNT_METRICS: tuple[str, ...] = ("num_valid_tokens", "num_valid_sequences", "is_masked_sequences")
SUMMED_METRICS: tuple[str, ...] = ("loss", "pg_loss", "kl_loss", *COUNT_METRICS)
MIN_METRICS: tuple[str, ...] = ("ratio_min",)
MAX_METRICS: tuple[str, ...] = ("ratio_max",)


# ----- normalization ------------------------------------------------------------------------------


def count_normalization_units(mask: torch.Tensor, *, normalization: Normalization) -> int:
    """Valid tokens ("token") or sequences with >= 1 valid token ("sequence") in `mask` (N, T)."""
    valid = mask.bool()
    match normalization:
        case "token":
            return int(valid.sum().item())
        case "sequence":
            return int(valid.any(dim=1).sum().item())
        case _:
            raise ValueError(f"normalization must be 'token' or 'sequence', got {normalization!r}")


def global_valid_tokens(batches: Sequence[Batch]) -> int:
    """Valid response tokens over `batches` (this rank's micro-batches; all-reduce SUM across ranks)."""
    return sum(batch.num_valid_tokens() for batch in batches)


def global_valid_sequences(batches: Sequence[Batch]) -> int:
    """Sequences with >= 1 valid token over `batches` (all-reduce SUM across ranks)."""
    return sum(batch.num_valid_sequences() for batch in batches)


def normalized_sum(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    *,
    normalization: Normalization,
    global_denominator: float | None = None,
) -> torch.Tensor:
    """Sum a per-token quantity over valid tokens and divide by the (global) count.

    "token": sum_{i,t valid} x_it / D.  "sequence": sum_i (sum_{t valid} x_it / n_i) / D, where
    n_i is sequence i's valid-token count. D is `global_denominator`, or the local count of valid
    tokens / valid sequences when it is None. Returns 0 (with a gradient) when nothing is valid.
    """
    valid = mask.bool()
    denominator = _resolve_denominator(valid, normalization, global_denominator)
    # torch.where, not multiplication, so NaN/inf at padded positions cannot leak into the sum
    masked = torch.where(valid, per_token, torch.zeros_like(per_token))
    match normalization:
        case "token":
            return masked.sum() / denominator
        case "sequence":
            tokens_per_sequence = valid.sum(dim=1).clamp(min=1).to(per_token.dtype)
            return (masked.sum(dim=1) / tokens_per_sequence).sum() / denominator
        case _:
            raise ValueError(f"normalization must be 'token' or 'sequence', got {normalization!r}")


def _resolve_denominator(valid: torch.Tensor, normalization: Normalization, global_denominator: float | None) -> float:
    local_count = count_normalization_units(valid, normalization=normalization)
    if global_denominator is None:
        return float(max(local_count, 1))
    global_count = float(global_denominator)
    if global_count < local_count:
        raise ValueError(
            f"global_denominator={global_count} is smaller than this micro-batch's own {local_count} valid "
            f"{'tokens' if normalization == 'token' else 'sequences'}; it must count the whole global batch "
            "(all micro-batches and data-parallel ranks) with the same normalization"
        )
    # D = 0 only when nothing anywhere is valid; every sum is then 0 and any divisor keeps it 0
    return global_count if global_count > 0 else 1.0


# ----- the clipped surrogate ------------------------------------------------------------------------


def clipped_pg_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    normalization: Normalization = "token",
    global_denominator: float | None = None,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level clipped surrogate with separate low/high clip bounds.

    Args:
        logprobs: (N, T) log pi_theta of the sampled tokens (carries the gradient).
        old_logprobs: (N, T) log pi_old of the same tokens.
        advantages: (N,) per sample or (N, T) per token.
        mask: (N, T); nonzero/True marks valid (trained) tokens.
        clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high].
        normalization, global_denominator: see `normalized_sum`.
        token_weights: optional (N,) or (N, T) multipliers of the per-token loss.

    Returns:
        The scalar loss and detached metrics over this call's valid tokens: ``clip_fraction_low``
        (share of valid tokens where the low clip is the active branch: A < 0 and
        r < 1 - clip_low, so their gradient is 0), ``clip_fraction_high`` (A > 0 and
        r > 1 + clip_high), ``ratio_mean``, ``ratio_min``, ``ratio_max`` and ``num_valid_tokens``.
        With no valid token the fractions and mean are 0, ratio_min is +inf and ratio_max is -inf
        (the neutral elements of min and max, so aggregation across micro-batches ignores them).
    """
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be (N, T), got shape {tuple(logprobs.shape)}")
    _check_shape("old_logprobs", old_logprobs, logprobs.shape)
    _check_shape("mask", mask, logprobs.shape)
    if not 0 <= clip_low < 1 or clip_high < 0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got clip_low={clip_low}, clip_high={clip_high}")
    valid = mask.bool()
    token_advantages = _broadcast_per_token("advantages", advantages, logprobs)
    # r_t = exp(log pi_theta - log pi_old), masked before exp so padding cannot overflow
    log_ratio = torch.where(valid, logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = log_ratio.exp()
    clipped_ratio = ratio.clamp(1 - clip_low, 1 + clip_high)
    # l_t = -min(r_t A_t, clip(r_t, 1 - clip_low, 1 + clip_high) A_t)
    per_token_loss = -torch.minimum(ratio * token_advantages, clipped_ratio * token_advantages)
    if token_weights is not None:
        per_token_loss = per_token_loss * _broadcast_per_token("token_weights", token_weights, logprobs)
    loss = normalized_sum(
        per_token_loss, valid, normalization=normalization, global_denominator=global_denominator
    )
    metrics = _ratio_metrics(ratio.detach(), token_advantages.detach(), valid, clip_low, clip_high)
    return loss, metrics


def _ratio_metrics(
    ratio: torch.Tensor, advantages: torch.Tensor, valid: torch.Tensor, clip_low: float, clip_high: float
) -> dict[str, torch.Tensor]:
    low_clip_active = valid & (advantages < 0) & (ratio < 1 - clip_low)
    high_clip_active = valid & (advantages > 0) & (ratio > 1 + clip_high)
    num_valid = valid.sum()
    inf = ratio.new_tensor([math.inf])
    return {
        "clip_fraction_low": _masked_mean(low_clip_active.to(ratio.dtype), valid),
        "clip_fraction_high": _masked_mean(high_clip_active.to(ratio.dtype), valid),
        "ratio_mean": _masked_mean(ratio, valid),
        "ratio_min": torch.cat([torch.where(valid, ratio, inf).flatten(), inf]).min(),
        "ratio_max": torch.cat([torch.where(valid, ratio, -inf).flatten(), -inf]).max(),
        "num_valid_tokens": num_valid,
    }


# ----- the loss object used by the trainer ---------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class PolicyLoss:
    """Joint CIPO loss: clipped PG on both streams, lambda_c on corrections, optional KL and TIS.

    L = sum_t w_t l_t / D + kl_beta * sum_t KL_t / D, with l_t the clipped surrogate above.

    - ``loss_weight`` (lambda_c, `cipo.loss_weight`): w_t includes lambda_c on tokens of samples whose
      ``sample_kind`` is "correction" (1 on "base" samples). Both streams share one D.
    - ``importance_sampling``: w_t also includes an importance weight between the sampler that
      drew the tokens (vLLM, possibly FP8, possibly one weight version behind: async) and the
      trainer's pi_old, detached, with rho_t = exp(old_t - gen_t), C = ``is_truncation`` and
      L = ``is_lower_bound``, as NeMo-RL names them (``truncated_importance_sampling_type``):
      ``is_type`` "tis" min(rho_t, C) (truncation bounds the variance); "icepop" rho_t where
      L <= rho_t <= C, else 0 (IcePop's token mask); "seq-mask-tis" rho_t where the sequence's
      geometric mean exp(mean_t log rho_t) lies in [L, C], else 0 for the whole sequence. A
      weight multiplies the token's surrogate and never its normalizer, so a zero-advantage
      sample stays exactly 0 (the trainer's skip of such samples remains exact).
    - ``kl_beta`` > 0 adds the KL to the reference policy per token, estimated with
      k1 = log pi - log pi_ref or k3 = exp(ref - lp) - (ref - lp) - 1 (Schulman's estimators,
      unclamped), normalized with the same D. Neither lambda_c nor TIS weights the KL term.

    Batch keys read: ``response_mask``, ``advantages`` (N,), ``old_logprobs`` (pi_old recomputed
    by the trainer; absent: pi_old is the policy being trained, detached), ``generation_logprobs`` (from the sampler), ``sample_kind``, and
    ``reference_logprobs`` when kl_beta > 0. Batch tensors are cast to the dtype of `logprobs`.

    Metrics (python floats) of one call: ``loss``, ``pg_loss``, ``kl_loss`` (beta * normalized KL),
    ``num_valid_tokens`` and ``num_valid_sequences`` are additive; ``ratio_min`` / ``ratio_max``
    combine by min / max; the rest are means over this call's valid tokens: ``kl`` (the raw
    per-token estimate; 0 when there is no ``reference_logprobs``), ``clip_fraction_low``,
    ``clip_fraction_high``, ``ratio_mean``, ``approx_entropy`` (mean of -log pi over sampled tokens,
    a one-sample estimate of the policy entropy on the sampler's tokens, not the full-vocabulary
    entropy), ``token_mult_prob_error`` (mean of exp(|gen - old|); 1 means sampler and trainer
    agree), ``tis_weight_mean`` (mean weight applied; 1 when TIS is off), ``is_truncated_fraction``
    (share of tokens whose weight the truncation or a mask changed); ``is_masked_sequences``
    (sequences seq-mask-tis zeroed) is additive. Combine the calls of a step (micro-batches and
    ranks) with `aggregate_metrics`.
    """

    clip_low: float
    clip_high: float
    normalization: Normalization
    kl_beta: float
    kl_estimator: KLEstimator
    importance_sampling: bool
    is_truncation: float
    is_type: ImportanceSamplingType
    is_lower_bound: float
    loss_weight: float

    def __post_init__(self) -> None:
        if not 0 <= self.clip_low < 1:
            raise ValueError(f"clip_low must be in [0, 1), got {self.clip_low}")
        if self.clip_high < 0:
            raise ValueError(f"clip_high must be >= 0, got {self.clip_high}")
        if self.normalization not in ("token", "sequence"):
            raise ValueError(f"normalization must be 'token' or 'sequence', got {self.normalization!r}")
        if self.kl_beta < 0:
            raise ValueError(f"kl_beta must be >= 0, got {self.kl_beta}")
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {self.kl_estimator!r}")
        if self.is_truncation <= 0:
            raise ValueError(f"is_truncation must be > 0, got {self.is_truncation}")
        if self.is_type not in ("tis", "icepop", "seq-mask-tis"):
            raise ValueError(f"is_type must be 'tis', 'icepop' or 'seq-mask-tis', got {self.is_type!r}")
        if not 0 <= self.is_lower_bound <= self.is_truncation:
            raise ValueError(f"is_lower_bound must be in [0, is_truncation={self.is_truncation}], got "
                             f"{self.is_lower_bound}")
        if self.loss_weight < 0:
            raise ValueError(f"loss_weight must be >= 0, got {self.loss_weight}")

    def local_denominator(self, batches: Sequence[Batch]) -> int:
        """This rank's share of D: valid tokens or sequences of its micro-batches (all-reduce SUM)."""
        match self.normalization:
            case "token":
                return global_valid_tokens(batches)
            case "sequence":
                return global_valid_sequences(batches)
            case _:
                raise ValueError(f"normalization must be 'token' or 'sequence', got {self.normalization!r}")

    def __call__(
        self, logprobs: torch.Tensor, batch: Batch, *, global_denominator: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one micro-batch, already divided by the global `global_denominator`."""
        valid = self._token_tensor(batch, "response_mask", logprobs, "it marks the trained tokens").bool()
        # without old_logprobs pi_old is the policy being trained (one optimizer step, on-policy): the ratio is
        # exp(lp - lp.detach()) = 1 with the gradient of lp, as a separate recompute would give (TRL's
        # num_iterations=1); the trainer decides that (trainer.needs_old_logprobs)
        old_logprobs = (self._token_tensor(batch, "old_logprobs", logprobs, "it is pi_old of the ratio")
                        if "old_logprobs" in batch else logprobs.detach())
        generation_logprobs = self._token_tensor(
            batch, "generation_logprobs", logprobs, "TIS and token_mult_prob_error use it"
        )
        if "advantages" not in batch:
            raise ValueError("PolicyLoss needs batch key 'advantages' (N,)")
        tis_weights, changed, masked_sequences = self._tis_weights(old_logprobs, generation_logprobs, valid)
        token_weights = self._stream_weights(batch, logprobs)[:, None] * tis_weights  # (N, T)
        pg_loss, pg_metrics = clipped_pg_loss(
            logprobs,
            old_logprobs,
            batch["advantages"].to(device=logprobs.device, dtype=logprobs.dtype),
            valid,
            clip_low=self.clip_low,
            clip_high=self.clip_high,
            normalization=self.normalization,
            global_denominator=global_denominator,
            token_weights=token_weights,
        )
        kl_per_token = self._kl_per_token(logprobs, batch, valid)
        kl_loss = self.kl_beta * normalized_sum(
            kl_per_token, valid, normalization=self.normalization, global_denominator=global_denominator
        )
        loss = pg_loss + kl_loss
        metrics = {
            "loss": loss.detach(),
            "pg_loss": pg_loss.detach(),
            "kl_loss": kl_loss.detach(),
            "kl": _masked_mean(kl_per_token.detach(), valid),
            **pg_metrics,
            "approx_entropy": _masked_mean(-logprobs.detach(), valid),
            # exp(|log p_gen - log p_old|) >= 1; > 1.05 means sampler and trainer disagree
            "token_mult_prob_error": _masked_mean((generation_logprobs - old_logprobs).abs().exp(), valid),
            "tis_weight_mean": _masked_mean(tis_weights, valid),
            "is_truncated_fraction": _masked_mean(changed.to(logprobs.dtype), valid),
            "is_masked_sequences": masked_sequences.sum(),
            "num_valid_sequences": valid.any(dim=1).sum(),
        }
        return loss, {name: float(value.item()) for name, value in metrics.items()}

    def _token_tensor(self, batch: Batch, key: str, logprobs: torch.Tensor, reason: str) -> torch.Tensor:
        if key not in batch:
            raise ValueError(f"PolicyLoss needs batch key {key!r} ({reason}); batch keys: {list(batch.keys())}")
        value = batch[key]
        _check_shape(key, value, logprobs.shape)
        if value.dtype == torch.bool:
            return value.to(device=logprobs.device)
        return value.to(device=logprobs.device, dtype=logprobs.dtype)

    def _stream_weights(self, batch: Batch, logprobs: torch.Tensor) -> torch.Tensor:
        # lambda_c on correction samples, 1 on base samples: (N,)
        weights = [self.loss_weight if kind == "correction" else 1.0 for kind in batch["sample_kind"]]
        return torch.tensor(weights, dtype=logprobs.dtype, device=logprobs.device)

    def _tis_weights(
        self, old_logprobs: torch.Tensor, generation_logprobs: torch.Tensor, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, T) detached importance weights, (N, T) which valid tokens the truncation or a mask changed, (N,)
        which sequences seq-mask-tis masked."""
        no_sequence = torch.zeros(valid.shape[0], dtype=torch.bool, device=valid.device)
        if not self.importance_sampling:
            return torch.ones_like(old_logprobs), torch.zeros_like(valid), no_sequence
        # log rho_t = log pi_old - log pi_gen, 0 on padding so that exp cannot overflow there
        log_ratio = torch.where(valid, old_logprobs - generation_logprobs, torch.zeros_like(old_logprobs)).detach()
        ratio = log_ratio.exp()
        low, high = self.is_lower_bound, self.is_truncation
        match self.is_type:
            case "tis":
                # w_t = min(rho_t, C)
                return ratio.clamp(max=high), valid & (ratio > high), no_sequence
            case "icepop":
                # w_t = rho_t * 1[L <= rho_t <= C]
                outside = valid & ((ratio < low) | (ratio > high))
                return torch.where(outside, torch.zeros_like(ratio), ratio), outside, no_sequence
            case _:  # "seq-mask-tis"
                # w_t = rho_t * 1[L <= exp(sum_t log rho_t / n_valid) <= C] (the sequence's geometric mean)
                geometric_mean = (log_ratio.sum(dim=1) / valid.sum(dim=1).clamp(min=1)).exp()
                masked = valid.any(dim=1) & ((geometric_mean < low) | (geometric_mean > high))
                weights = torch.where(masked[:, None], torch.zeros_like(ratio), ratio)
                return weights, valid & masked[:, None], masked

    def _kl_per_token(self, logprobs: torch.Tensor, batch: Batch, valid: torch.Tensor) -> torch.Tensor:
        if self.kl_beta == 0 and "reference_logprobs" not in batch:
            return torch.zeros_like(logprobs)
        reference_logprobs = self._token_tensor(
            batch, "reference_logprobs", logprobs, f"kl_beta={self.kl_beta} > 0 needs the reference policy"
        )
        # d_t = log pi_ref - log pi_theta, masked before exp so padding cannot overflow
        log_ratio = torch.where(valid, reference_logprobs - logprobs, torch.zeros_like(logprobs))
        match self.kl_estimator:
            case "k1":
                # k1_t = log pi_theta - log pi_ref
                return -log_ratio
            case "k3":
                # k3_t = exp(d_t) - d_t - 1
                return log_ratio.exp() - log_ratio - 1
            case _:
                raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {self.kl_estimator!r}")


def aggregate_metrics(per_call_metrics: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Combine `PolicyLoss` metrics of several micro-batches (and ranks) into the step's metrics.

    SUMMED_METRICS add up (the losses are already globally normalized, so their sum is the
    full-batch loss), MIN_METRICS / MAX_METRICS take min / max, and every other metric is a mean
    over valid tokens, combined weighted by ``num_valid_tokens``.
    """
    if not per_call_metrics:
        raise ValueError("aggregate_metrics needs at least one metrics dict")
    names = list(per_call_metrics[0])
    for position, metrics in enumerate(per_call_metrics):
        if set(metrics) != set(names):
            raise ValueError(f"metrics dict {position} has keys {sorted(metrics)}, expected {sorted(names)}")
    token_counts = [metrics["num_valid_tokens"] for metrics in per_call_metrics]
    total_tokens = sum(token_counts)
    aggregated: dict[str, float] = {}
    for name in names:
        values = [metrics[name] for metrics in per_call_metrics]
        if name in SUMMED_METRICS:
            aggregated[name] = sum(values)
        elif name in MIN_METRICS:
            aggregated[name] = min(values)
        elif name in MAX_METRICS:
            aggregated[name] = max(values)
        else:
            weighted = sum(value * count for value, count in zip(values, token_counts))
            aggregated[name] = weighted / total_tokens if total_tokens > 0 else 0.0
    return aggregated


# ----- small helpers -----------------------------------------------------------------------------------


def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    masked = torch.where(valid, values, torch.zeros_like(values))
    return masked.sum() / valid.sum().clamp(min=1)


def _check_shape(name: str, tensor: torch.Tensor, expected: torch.Size) -> None:
    if tensor.shape != expected:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(expected)} like logprobs")


def _broadcast_per_token(name: str, values: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """(N,) per-sample or (N, T) per-token values as an (N, T)-broadcastable tensor."""
    if values.shape == logprobs.shape:
        return values
    if values.dim() == 1 and values.shape[0] == logprobs.shape[0]:
        return values[:, None]
    raise ValueError(
        f"{name} must have shape (N,)=({logprobs.shape[0]},) or (N, T)={tuple(logprobs.shape)}, "
        f"got {tuple(values.shape)}"
    )


def build_loss(cfg: MasterConfig) -> PolicyLoss:
    """The run's loss from `loss.*` and the correction stream's weight `cipo.loss_weight`."""
    loss = cfg.loss
    return PolicyLoss(clip_low=loss.clip_low, clip_high=loss.clip_high, normalization=loss.normalization,
                      kl_beta=loss.kl_beta, kl_estimator=loss.kl_estimator,
                      importance_sampling=loss.importance_sampling, is_truncation=loss.is_truncation,
                      is_type=loss.is_type, is_lower_bound=loss.is_lower_bound, loss_weight=cfg.cipo.loss_weight)
