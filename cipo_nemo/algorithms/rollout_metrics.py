"""What a step's rollouts were, as metrics: rewards per stream and prompt group, verifier verdicts, token counts."""

from __future__ import annotations

from collections.abc import Callable

import torch

from cipo_nemo.algorithms.rewards import is_success
from cipo_nemo.data.batch import Batch


def rollout_metrics(base: Batch, corrections: Batch | None, *, tokens_discarded: float = 0.0) -> dict[str, float | None]:
    """reward/*, tokens/generated (every sampled response token, `tokens_discarded` by dynamic sampling included:
    what generation cost), tokens/<stream>_sequence (prompt + response tokens: what logprobs and train process)."""
    return {
        "reward/base_mean": float(base["rewards"].mean()),
        "reward/base_pass_rate": float(is_success(base["rewards"]).float().mean()),
        "reward/prompts_all_correct": share_of_groups(base, lambda r: bool(is_success(r).all())),
        "reward/prompts_all_wrong": share_of_groups(base, lambda r: bool((~is_success(r)).all())),
        "reward/correction_mean": None if corrections is None else float(corrections["rewards"].mean()),
        "tokens/generated": float(response_tokens(base) + response_tokens(corrections) + tokens_discarded),
        "tokens/base_sequence": float(sequence_tokens(base)),
        "tokens/correction_sequence": float(sequence_tokens(corrections)),
        "response_length/base_mean": float(base["response_mask"].sum(dim=1).float().mean()),
    }


def verifier_counts(batch: Batch) -> dict[str, float]:
    """verifier/<reason>: how many samples the verifier gave each reason."""
    reasons = batch["verifier_reason"]
    return {f"verifier/{reason}": float(sum(r == reason for r in reasons)) for reason in sorted(set(reasons))}


def response_tokens(batch: Batch | None) -> int:
    return 0 if batch is None else batch.num_valid_tokens()


def sequence_tokens(batch: Batch | None) -> int:
    return 0 if batch is None else int((batch["prompt_mask"] | batch["response_mask"]).sum())


def share_of_groups(batch: Batch, predicate: Callable[[torch.Tensor], bool]) -> float:
    """The share of the batch's prompt groups whose rewards satisfy `predicate`."""
    groups = batch.group_indices()
    hits = sum(predicate(batch["rewards"][indices]) for indices in groups.values())
    return hits / max(len(groups), 1)
