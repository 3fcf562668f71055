"""Token logprobs from the last hidden states, a chunk of tokens at a time.

log p(target | context) = logits[target] - logsumexp(logits), with logits = lm_head(hidden). Computed over the
whole micro-batch at once this materializes (tokens, vocab) fp32 logits plus a same-sized log-softmax: at vocab
49k and 8 x 1024 tokens that is 3.2 GB for a number per token. Here the output projection and the log-softmax run
over `chunk_tokens` tokens at a time, so only one chunk's logits live at once.

With gradients on and more than one chunk, each chunk runs under activation checkpointing (non-reentrant): the
forward keeps only the chunk's hidden states, and the backward recomputes that chunk's logits, so the backward never
holds full-vocab logits either. The price is one more output-projection forward per training pass. A single chunk
is not checkpointed: its backward follows its forward directly (megatron's schedules run a micro-batch's backward
before the next forward on the last stage), and the recompute would hold the same logits at the same point.

A training pass scores only the positions whose next token is trained (`positions`: the response tokens), as
TRL's `logits_to_keep` does: the prompt's positions go through the decoder (the response attends to them) but
not through the output projection, which at vocab 49k and hidden 576 is about a fifth of a small model's FLOPs
per position.

Both policy backends use it: the HF policy with its lm_head and F.cross_entropy, the Megatron worker with its
(vocab-parallel) output layer and `vocab_parallel_cross_entropy`, which all-reduces over the vocab shards per
chunk exactly as it does for a whole micro-batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

Projection = Callable[[torch.Tensor], torch.Tensor]  # hidden (..., H) -> logits (..., V or V / TP)
TokenLogprobs = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits (..., V), targets (...)) -> (...)


def chunked_token_logprobs(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    project: Projection,
    token_logprobs: TokenLogprobs,
    chunk_tokens: int,
    dim: int,
) -> torch.Tensor:
    """Logprobs of `targets` (hidden's shape without the last dim), computed in chunks along `dim`.

    A chunk spans as many positions of `dim` as hold about `chunk_tokens` tokens (at least one position);
    `chunk_tokens` 0 means the whole tensor in one piece, without checkpointing (the unchunked computation)."""
    tokens_per_position = math.prod(targets.shape) // max(1, targets.shape[dim])
    positions = max(1, chunk_tokens // max(1, tokens_per_position))
    if chunk_tokens == 0 or targets.shape[dim] <= positions:
        return token_logprobs(project(hidden), targets)
    parts = []
    for hidden_chunk, target_chunk in zip(hidden.split(positions, dim), targets.split(positions, dim), strict=True):
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_logprobs, hidden_chunk, target_chunk, project, token_logprobs,
                                    use_reentrant=False, preserve_rng_state=False))
        else:
            parts.append(_chunk_logprobs(hidden_chunk, target_chunk, project, token_logprobs))
    return torch.cat(parts, dim)


def token_logprobs_at(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    positions: torch.Tensor | None,
    *,
    project: Projection,
    token_logprobs: TokenLogprobs,
    chunk_tokens: int,
    dim: int,
) -> torch.Tensor:
    """`chunked_token_logprobs` at the True entries of `positions` (targets' shape) only, 0 elsewhere; None scores
    every position. The selected hidden states are scored as an (n, 1, H) tensor in chunks of `chunk_tokens`."""
    if positions is None:
        return chunked_token_logprobs(hidden, targets, project=project, token_logprobs=token_logprobs,
                                      chunk_tokens=chunk_tokens, dim=dim)
    selected = chunked_token_logprobs(hidden[positions].unsqueeze(1), targets[positions].unsqueeze(1),
                                      project=project, token_logprobs=token_logprobs, chunk_tokens=chunk_tokens,
                                      dim=0)
    # masked_scatter fills positions in the same row-major order as the boolean index above took them
    return torch.zeros(targets.shape, dtype=selected.dtype, device=selected.device).masked_scatter(
        positions, selected.squeeze(1))


def _chunk_logprobs(
    hidden: torch.Tensor, targets: torch.Tensor, project: Projection, token_logprobs: TokenLogprobs
) -> torch.Tensor:
    return token_logprobs(project(hidden), targets)


def full_vocab_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[target] in fp32 over an unsharded vocabulary (= -cross_entropy per token).

    The same function with and without gradients (no in-place shortcut for the no-grad pass): a logprob pass and
    a training pass on the same weights and shapes give the same numbers. (A training pass projects only the
    response positions, so its products have other shapes: the two agree to ~1e-6, not bit for bit.)"""
    per_token = torch.nn.functional.cross_entropy(
        logits.float().flatten(0, -2), targets.flatten(), reduction="none"
    )
    return -per_token.view_as(targets)


def megatron_logprob_processor(chunk_tokens: int) -> Callable[..., torch.Tensor]:
    """An `output_processor` for megatron's GPTModel.forward (models/gpt/gpt_model.py `_postprocess`): instead of
    the logits, the model returns (rows, S) logprobs of the context's (rows, S) targets, at its (rows, S) positions
    only (None: all; `token_logprobs_at`)."""

    def next_token_logprobs(*, hidden_states: torch.Tensor, output_layer: Any, output_weight: torch.Tensor | None,
                            runtime_gather_output: bool | None,
                            context: tuple[torch.Tensor, torch.Tensor | None],
                            scale_logits: Projection, **_: Any) -> torch.Tensor:
        from megatron.core import tensor_parallel

        def project(hidden: torch.Tensor) -> torch.Tensor:  # [s, b, H] -> [s, b, V / TP]
            logits, _ = output_layer(hidden, weight=output_weight, runtime_gather_output=runtime_gather_output)
            return scale_logits(logits)

        def vocab_parallel_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return -tensor_parallel.vocab_parallel_cross_entropy(logits.float(), targets)

        targets, positions = context
        targets = targets.transpose(0, 1).contiguous()  # (rows, S) -> [s, b], as megatron lays out tokens
        if output_layer.sequence_parallel:
            # the hidden states hold S / TP positions per rank that the output layer all-gathers: chunks or a
            # selection of them would interleave positions, so that case runs unchunked over every position
            logprobs = vocab_parallel_logprobs(project(hidden_states), targets)
        else:
            positions = None if positions is None else positions.transpose(0, 1)
            logprobs = token_logprobs_at(hidden_states, targets, positions, project=project,
                                         token_logprobs=vocab_parallel_logprobs, chunk_tokens=chunk_tokens, dim=0)
        return logprobs.transpose(0, 1)  # megatron's [s, b] -> (rows, S)

    return next_token_logprobs
