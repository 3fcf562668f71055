"""Synthetic policy batches for the speed benchmarks, the probes and the GPU check: the one builder.

Rows are right-padded random tokens, each a prompt followed by a response of the lengths the caller draws; the
length distributions (a study's, the step-speed benchmark's) belong to the callers, the tensors are built here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from cipo_nemo.algorithms.loss import PolicyLoss
from cipo_nemo.data.batch import Batch

PAD_ID = 3  # right padding, below the drawn tokens' range [4, vocab): no real token looks like it
# A clip-higher surrogate (0.2 / 0.28), token-normalized, no KL or importance sampling: the train step benchmarks time.
LOSS = PolicyLoss(clip_low=0.2, clip_high=0.28, normalization="token", kl_beta=0.0, kl_estimator="k3",
                  importance_sampling=False, is_truncation=2.0, is_type="tis", is_lower_bound=0.5,
                  loss_weight=1.0)


def synthetic_batch(prompt_lengths: Sequence[int], response_lengths: Sequence[int], *, vocab_size: int,
                    generator: torch.Generator, group_size: int, width: int | None = None) -> Batch:
    """Row i: prompt_lengths[i] prompt tokens, then response_lengths[i] response tokens, then padding to `width`
    (default: the longest row). Consecutive rows form groups of `group_size`; advantages are standard normal."""
    rows = len(prompt_lengths)
    width = width or max(p + r for p, r in zip(prompt_lengths, response_lengths))
    input_ids = torch.full((rows, width), PAD_ID, dtype=torch.long)
    prompt_mask = torch.zeros(rows, width, dtype=torch.bool)
    response_mask = torch.zeros(rows, width, dtype=torch.bool)
    for row, (prompt, response) in enumerate(zip(prompt_lengths, response_lengths)):
        input_ids[row, : prompt + response] = torch.randint(4, vocab_size, (prompt + response,), generator=generator)
        prompt_mask[row, :prompt] = True
        response_mask[row, prompt : prompt + response] = True
    # log pi_old(token) = -log V: a uniform policy's, which a randomly initialized model is close to
    old_logprobs = torch.where(response_mask, torch.full((rows, width), -math.log(vocab_size)), 0.0)
    return Batch({
        "input_ids": input_ids, "prompt_mask": prompt_mask, "response_mask": response_mask,
        "old_logprobs": old_logprobs, "generation_logprobs": old_logprobs.clone(),
        "advantages": torch.randn(rows, generator=generator), "group_id": torch.arange(rows) // group_size,
        "sample_kind": ["base"] * rows,
    })


def variable_length_batch(*, vocab_size: int, lengths: Sequence[int], seq: int | None = None, seed: int = 0,
                          group_size: int = 2) -> Batch:
    """Rows of the given total lengths, the first quarter of each (at least one token) prompt, the rest response."""
    prompts = [max(1, length // 4) for length in lengths]
    return synthetic_batch(prompts, [length - prompt for length, prompt in zip(lengths, prompts)],
                           vocab_size=vocab_size, generator=torch.Generator().manual_seed(seed),
                           group_size=group_size, width=seq)


def rollout_shaped_batch(*, samples: int, vocab_size: int, seed: int = 0) -> Batch:
    """Rows shaped like the step-speed benchmark's rollouts: a chat prompt of 44-50 tokens, 56-64 sampled tokens,
    groups of 4."""
    generator = torch.Generator().manual_seed(seed)
    prompt_lengths = torch.randint(44, 51, (samples,), generator=generator).tolist()
    response_lengths = torch.randint(56, 65, (samples,), generator=generator).tolist()
    return synthetic_batch(prompt_lengths, response_lengths, vocab_size=vocab_size, generator=generator,
                           group_size=4)
