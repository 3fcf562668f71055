"""What both policy backends share about micro-batches: which samples go together, and how per-position
next-token logprobs become the interfaces.py alignment. Also the mini-batches of one rollout batch (one optimizer
step each), which the trainer plans the same way for every backend.

Alignment (cipo_nemo/models/interfaces.py): `logprobs[:, t] = log p(input_ids[:, t] | input_ids[:, :t])`, 0 at
t = 0 and outside `prompt_mask | response_mask`. A model's output at position s predicts token s + 1, so the
per-position logprobs are shifted right by one; a packed row is split back into its samples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cipo_nemo.algorithms.loss import COUNT_METRICS, MAX_METRICS, MIN_METRICS, PolicyLoss
from cipo_nemo.data.batch import Batch
from cipo_nemo.data.packing import PackedRow, plan_packed_rows, sequence_lengths, unpack_logprobs
from cipo_nemo.models.interfaces import PolicyBackend


def plan_micro_batches(
    batch: Batch, micro_batch_size: int, *, sequence_packing: bool, max_total_sequence_length: int
) -> list[tuple[Batch, PackedRow | None]]:
    """Micro-batches of `micro_batch_size` samples, or (packing) rows of as many tokens as that many full-length
    samples hold, filled first-fit decreasing; each with its samples and, when packed, its row."""
    if not sequence_packing:
        return [(samples, None) for samples in batch.micro_batches(micro_batch_size)]
    capacity = micro_batch_size * max_total_sequence_length
    rows = plan_packed_rows(sequence_lengths(batch), capacity)
    return [(batch.select(list(row.indices)), row) for row in rows]


def sorted_by_length(batch: Batch) -> Batch:
    """The samples shortest first, for a training step: consecutive micro-batches then hold similar lengths and
    each is trimmed to its own longest, so less padding is computed (responses that stop early leave 30-40% of a
    batch's positions as padding). The step's gradient is a sum over samples (every micro-batch loss is divided by
    the whole batch's denominator), so the order changes it by float rounding only."""
    lengths = sequence_lengths(batch)
    return batch.select(sorted(range(len(batch)), key=lengths.__getitem__))


def next_token_targets(input_ids: torch.Tensor) -> torch.Tensor:
    """targets[:, s] = input_ids[:, s + 1]; the last column wraps around and is masked by `align_logprobs`."""
    return torch.roll(input_ids, shifts=-1, dims=1)


def trained_positions(response_mask: torch.Tensor) -> torch.Tensor:
    """positions[:, s] = response_mask[:, s + 1] (bool, (rows, S) in the model's layout): the outputs whose
    logprob enters the loss, i.e. those that predict a response token; the last column predicts nothing."""
    positions = torch.zeros_like(response_mask, dtype=torch.bool)
    positions[:, :-1] = response_mask[:, 1:].bool()
    return positions


def align_logprobs(
    next_token_logprobs: torch.Tensor, *, samples: Batch, packed_row: PackedRow | None, full_length: int
) -> torch.Tensor:
    """(n, full_length) logprobs from (rows, S) per-position ones (column s scores token s + 1).

    Unpacked: rows beyond the n samples (pipeline padding) and columns beyond `full_length` (TP rounding) are
    dropped, short ones padded. Packed: the single row is split back per sample. Zero outside each sample."""
    logprobs = F.pad(next_token_logprobs[:, :-1], (1, 0))  # logprobs[:, t] scores token t
    if packed_row is None:
        logprobs = logprobs[: len(samples), :full_length]
        logprobs = F.pad(logprobs, (0, full_length - logprobs.shape[1]))
    else:
        logprobs = unpack_logprobs(logprobs[0], packed_row, full_length)
    sequence_mask = (samples["prompt_mask"] | samples["response_mask"]).to(logprobs.device)
    return torch.where(sequence_mask, logprobs, torch.zeros_like(logprobs))


# ----- mini-batches: several optimizer steps per rollout batch --------------------------------------------------


def plan_mini_batches(
    num_samples: int, *, size: int | None, epochs: int, generator: torch.Generator
) -> list[list[int]]:
    """Sample indices of each optimizer step: `epochs` passes, each a fresh permutation (drawn from `generator`)
    cut into mini-batches of `size` (the last one may be smaller). One step over all samples in their own order
    when `size` is None or covers the batch and `epochs` is 1 (no reordering: today's single step)."""
    size = num_samples if size is None else min(size, num_samples)
    if epochs == 1 and size == num_samples:
        return [list(range(num_samples))]
    plan = []
    for _ in range(epochs):
        order = torch.randperm(num_samples, generator=generator).tolist()
        plan += [order[start : start + size] for start in range(0, num_samples, size)]
    return plan


@dataclass(frozen=True)
class OptimizerStep:
    """One planned optimizer step: the samples it trains and the loss normalizer of its whole mini-batch."""

    indices: list[int]  # samples sent to the train pass (those that carry gradient, when the skip is on)
    denominator: float  # valid tokens / sequences of the whole mini-batch, skipped samples included
    planned: int  # samples in the mini-batch before the skip

    @property
    def skipped(self) -> int:
        return self.planned - len(self.indices)


def plan_optimizer_steps(
    batch: Batch, loss_fn: PolicyLoss, *, size: int | None, epochs: int, generator: torch.Generator,
    carries_gradient: torch.Tensor | None,
) -> list[OptimizerStep]:
    """The mini-batches of `plan_mini_batches` over ALL samples (the same draw with or without the skip), each
    keeping only the samples that `carries_gradient` marks (None: all) and the normalizer D_k it had with every
    sample in: sum_{i in k, live} g_i / D_k is then the unskipped step's gradient, since g_i = 0 for the rest."""
    steps = []
    for indices in plan_mini_batches(len(batch), size=size, epochs=epochs, generator=generator):
        denominator = float(loss_fn.local_denominator([batch.select(indices)]))
        kept = indices if carries_gradient is None else [i for i in indices if bool(carries_gradient[i])]
        steps.append(OptimizerStep(indices=kept, denominator=denominator, planned=len(indices)))
    return steps


def take_optimizer_steps(
    policy: PolicyBackend, batch: Batch, plan: list[OptimizerStep], loss_fn: PolicyLoss,
    *, after_each: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """Each planned step on `policy`: its samples with its normalizer, or, when none of its samples carries
    gradient, no optimizer step but the learning-rate tick it would have had. Returns the combined metrics."""
    results, skipped_lr = [], None
    for planned in plan:
        if planned.indices:
            results.append(policy.train(batch.select(planned.indices), loss_fn, global_denominator=planned.denominator))
        else:
            skipped_lr = policy.skip_optimizer_step()
        after_each()
    metrics = combine_optimizer_steps(results, skipped=len(plan) - len(results))
    if not results:
        metrics["lr"] = skipped_lr
    return metrics


def combine_optimizer_steps(per_step: list[dict[str, float]], *, skipped: int = 0) -> dict[str, float]:
    """One step's train metrics from several optimizer steps: losses, ratios, clip fractions and grad norms are
    means over the optimizer steps (each step's loss is normalized by its own mini-batch), token and sequence
    counts add up, ratio_min / ratio_max are extremes, lr is the last one; plus `optimizer_steps` and
    `optimizer_steps_skipped` (planned steps none of whose samples carried gradient: not taken). With no step
    taken the loss is exactly 0 (every advantage was 0) and the step's other loss metrics are absent."""
    counts = {"optimizer_steps": float(len(per_step)), "optimizer_steps_skipped": float(skipped)}
    if not per_step:
        return {"loss": 0.0, "pg_loss": 0.0, "kl_loss": 0.0, "grad_norm": 0.0, "num_valid_tokens": 0.0, **counts}
    if len(per_step) == 1:
        return {**per_step[0], **counts}
    combined = {}
    for name in per_step[0]:
        values = [metrics[name] for metrics in per_step]
        if name in COUNT_METRICS:
            combined[name] = sum(values)
        elif name in MIN_METRICS:
            combined[name] = min(values)
        elif name in MAX_METRICS:
            combined[name] = max(values)
        elif name == "lr":
            combined[name] = values[-1]
        else:
            combined[name] = sum(values) / len(values)
    return {**combined, **counts}


def trained_per_stream(batch: Batch, plan: list[OptimizerStep]) -> dict[str, float]:
    """train/samples_skipped/<stream>: samples no train pass saw; train/tokens_trained/<stream>: response tokens
    the train passes computed (over every optimizer step)."""
    trained_any = torch.zeros(len(batch), dtype=torch.bool)
    passes = torch.zeros(len(batch))
    for planned in plan:
        trained_any[planned.indices] = True
        passes[planned.indices] += 1
    tokens = batch["response_mask"].sum(dim=1).float().cpu()
    metrics = {}
    for stream in ("base", "correction"):
        in_stream = torch.tensor([kind == stream for kind in batch["sample_kind"]], dtype=torch.bool)
        metrics[f"samples_skipped/{stream}"] = float((in_stream & ~trained_any).sum())
        metrics[f"tokens_trained/{stream}"] = float((tokens * passes)[in_stream].sum())
    return metrics
