"""Shared inputs of the policy tests: a policy config for a tiny model, a hand-built batch, the loss."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from cipo_nemo.algorithms.loss import PolicyLoss
from cipo_nemo.config import load_config
from cipo_nemo.config.schema import PolicyConfig
from cipo_nemo.data.batch import Batch
from cipo_nemo.models.policy.microbatches import OptimizerStep, plan_optimizer_steps

BASE_CONFIG = Path(__file__).resolve().parents[2] / "conf" / "cipo_base.yaml"
LR = 1.0e-3
# Adam's first update is lr * g / (|g| + eps): on near-zero gradients (rarely used embedding rows) it amplifies
# float summation-order noise in g by up to lr / eps. eps 1e-6 instead of 1e-8 damps that 100x, and leaves the
# update of every ordinary gradient (|g| ~ 1e-3 here) at lr * sign(g)
ADAM_EPS = 1.0e-6
# weights after one step (steps of ~LR) agree to 1% of the step size
STEP_WEIGHT_TOLERANCE = LR / 100
PAD_ID = 3  # the tiny tokenizer's <pad>; never used inside a sequence
FIRST_ORDINARY_ID = 4  # ids 0-3 are special tokens

# clip-higher, a down-weighted correction stream and TIS: every weight of the loss is exercised
LOSS = PolicyLoss(
    clip_low=0.2,
    clip_high=0.28,
    normalization="token",
    kl_beta=0.0,
    kl_estimator="k3",
    importance_sampling=True,
    is_truncation=2.0,
    is_type="tis",
    is_lower_bound=0.5,
    loss_weight=0.5,
)


def make_policy(model_dir: Path, *, megatron: dict[str, Any] | None = None, **fields: Any) -> PolicyConfig:
    """The exemplar's policy section for `model_dir`: fp32, lr 1e-3 (a visible step) decaying linearly to 0,
    Adam eps 1e-6, cpu_copy reference."""
    policy = load_config(
        BASE_CONFIG,
        [
            f"policy.model_name={model_dir}",
            "policy.precision=fp32",
            "policy.reference_policy=cpu_copy",
            f"policy.optimizer.lr={LR}",
            f"policy.optimizer.adam_eps={ADAM_EPS}",
            "policy.optimizer.min_lr=0.0",
            "policy.optimizer.decay=linear",
        ],
    ).policy
    megatron_cfg = policy.megatron.model_copy(update=megatron or {})
    return policy.model_copy(update={"megatron": megatron_cfg, **fields})


def make_batch(*, vocab_size: int, num_samples: int = 8, length: int = 24, seed: int = 0) -> Batch:
    """Prompts of 3-8 tokens and responses of 2+ tokens, right-padded to `length`; groups of 2; the second
    half are correction samples. old/generation logprobs sit near a uniform policy's -log(V), so that some
    ratios are clipped and some are not."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.full((num_samples, length), PAD_ID, dtype=torch.long)
    prompt_mask = torch.zeros(num_samples, length, dtype=torch.bool)
    response_mask = torch.zeros(num_samples, length, dtype=torch.bool)
    for row in range(num_samples):
        prompt_length = int(torch.randint(3, 9, (1,), generator=generator))
        response_length = int(torch.randint(2, length - prompt_length + 1, (1,), generator=generator))
        total = prompt_length + response_length
        input_ids[row, :total] = torch.randint(FIRST_ORDINARY_ID, vocab_size, (total,), generator=generator)
        prompt_mask[row, :prompt_length] = True
        response_mask[row, prompt_length:total] = True
    uniform = -math.log(vocab_size)
    old_logprobs = uniform + 0.15 * torch.randn(num_samples, length, generator=generator)
    generation_logprobs = old_logprobs + 0.05 * torch.randn(num_samples, length, generator=generator)
    return Batch(
        {
            "group_id": torch.arange(num_samples) // 2,
            "sample_kind": ["base"] * (num_samples // 2) + ["correction"] * (num_samples - num_samples // 2),
            "input_ids": input_ids,
            "prompt_mask": prompt_mask,
            "response_mask": response_mask,
            "old_logprobs": torch.where(response_mask, old_logprobs, torch.zeros_like(old_logprobs)),
            "generation_logprobs": torch.where(response_mask, generation_logprobs, torch.zeros_like(old_logprobs)),
            "advantages": torch.randn(num_samples, generator=generator),
        }
    )


ZERO_ADVANTAGE = [1, 4, 5, 6]  # make_batch's samples set to A = 0 by the skip tests (base and correction ones)


def with_zero_advantages(batch: Batch) -> Batch:
    batch["advantages"][ZERO_ADVANTAGE] = 0.0
    return batch


def skip_plans(batch: Batch, loss: PolicyLoss) -> tuple[list[OptimizerStep], list[OptimizerStep]]:
    """Two epochs of mini-batches of 4 over make_batch's 8 samples, without and with the zero-advantage skip
    (the trainer's plan_optimizer_steps; with this seed every mini-batch keeps a sample)."""
    plans = []
    for carries_gradient in (None, batch["advantages"] != 0):
        plans.append(plan_optimizer_steps(batch, loss, size=4, epochs=2, generator=torch.Generator().manual_seed(3),
                                          carries_gradient=carries_gradient))
    return plans[0], plans[1]


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), f"different tensor names: {sorted(set(a) ^ set(b))}"
    return max(max_abs_diff(a[name], b[name]) for name in a)
