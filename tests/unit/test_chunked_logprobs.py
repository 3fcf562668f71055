"""Chunked token logprobs (cipo_nemo/models/policy/chunked_logprobs.py) equal the whole-micro-batch computation,
values and gradients, and the chunks really bound how many logits exist at once; a training pass projects only the
positions whose next token is trained."""

from __future__ import annotations

import pytest
import torch

from cipo_nemo.models.policy.chunked_logprobs import chunked_token_logprobs, full_vocab_logprobs, token_logprobs_at
from cipo_nemo.models.policy.microbatches import trained_positions


def _case(vocab: int, rows: int, length: int, hidden: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(rows, length, hidden, generator=generator, requires_grad=True)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=generator))
    targets = torch.randint(0, vocab, (rows, length), generator=generator)
    return states, head, targets


def _naive(states: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
    # log p = log_softmax(W h)[target], over the full vocabulary for the whole micro-batch
    return torch.log_softmax(head(states).float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)


@pytest.mark.parametrize(("vocab", "chunk_tokens"), [(7, 1), (7, 5), (7, 1000), (49152, 3), (49152, 8)])
def test_chunked_equals_full_vocab_values_and_gradients(vocab: int, chunk_tokens: int) -> None:
    states, head, targets = _case(vocab, rows=2, length=6)
    chunked = chunked_token_logprobs(states, targets, project=head, token_logprobs=full_vocab_logprobs,
                                     chunk_tokens=chunk_tokens, dim=1)
    weights = torch.randn(targets.shape, generator=torch.Generator().manual_seed(1))  # a loss with unequal weights
    (chunked * weights).sum().backward()
    chunked_grads = states.grad.clone(), head.weight.grad.clone()
    states.grad, head.weight.grad = None, None

    naive = _naive(states, head, targets)
    (naive * weights).sum().backward()
    assert chunked.shape == naive.shape == targets.shape
    torch.testing.assert_close(chunked, naive, rtol=0, atol=1e-5)
    # The state gradient sums p_v W_v over the whole vocabulary in fp32, and the kernel's accumulation order
    # follows the chunk's shape: at vocab 49152 a 3-token chunk was 1.0e-4 from a float64 reference on an AMD EPYC
    # (the whole-batch pass 2.5e-5; gradients up to 3.8). A misplaced chunk or a lost gradient is off by O(1).
    atol = 1e-6 if vocab < 1000 else 5e-4
    torch.testing.assert_close(chunked_grads[0], states.grad, rtol=1e-5, atol=atol)
    torch.testing.assert_close(chunked_grads[1], head.weight.grad, rtol=1e-5, atol=atol)


def test_chunks_bound_the_logits_alive_at_once() -> None:
    """The projection never sees more than one chunk of tokens, forward or backward (recomputed per chunk)."""
    states, head, targets = _case(vocab=11, rows=3, length=10)
    seen_tokens = []

    def project(hidden: torch.Tensor) -> torch.Tensor:
        seen_tokens.append(hidden.shape[0] * hidden.shape[1])
        return head(hidden)

    logprobs = chunked_token_logprobs(states, targets, project=project, token_logprobs=full_vocab_logprobs,
                                      chunk_tokens=6, dim=1)
    forward_calls = len(seen_tokens)
    logprobs.sum().backward()
    assert forward_calls == 5  # 6 tokens / 3 rows = 2 positions per chunk, 10 positions
    assert len(seen_tokens) == 2 * forward_calls  # the backward recomputes each chunk's logits
    assert max(seen_tokens) == 6


def test_zero_chunk_tokens_is_one_unchunked_pass() -> None:
    states, head, targets = _case(vocab=11, rows=2, length=4)
    calls = []
    chunked_token_logprobs(states, targets, project=lambda h: calls.append(h.shape) or head(h),
                           token_logprobs=full_vocab_logprobs, chunk_tokens=0, dim=1)
    assert calls == [states.shape]


def test_chunks_along_the_first_dim_as_megatron_lays_out_tokens() -> None:
    """Megatron's hidden states are [s, b, H]: chunking along dim 0 gives the same logprobs."""
    states, head, targets = _case(vocab=13, rows=2, length=9)
    sbh = states.detach().transpose(0, 1).contiguous()
    chunked = chunked_token_logprobs(sbh, targets.transpose(0, 1), project=head, token_logprobs=full_vocab_logprobs,
                                     chunk_tokens=4, dim=0)
    torch.testing.assert_close(chunked.transpose(0, 1), _naive(states.detach(), head, targets), rtol=0, atol=1e-5)


def test_a_single_chunk_is_not_recomputed_in_the_backward() -> None:
    """Checkpointing one chunk would recompute the same logits at the same point of the backward: one projection."""
    states, head, targets = _case(vocab=11, rows=2, length=4)
    calls = []
    logprobs = chunked_token_logprobs(states, targets, project=lambda h: calls.append(h.shape) or head(h),
                                      token_logprobs=full_vocab_logprobs, chunk_tokens=8, dim=1)
    logprobs.sum().backward()
    assert calls == [states.shape]
    assert states.grad is not None and head.weight.grad is not None


def test_trained_positions_are_the_outputs_that_predict_a_response_token() -> None:
    response_mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    assert trained_positions(response_mask).tolist() == [[False, True, True, False, False],
                                                         [True, True, True, True, False]]


@pytest.mark.parametrize("chunk_tokens", [0, 2, 100])
def test_logprobs_at_positions_equal_the_full_pass_there_and_are_zero_elsewhere(chunk_tokens: int) -> None:
    states, head, targets = _case(vocab=13, rows=3, length=7)
    positions = torch.rand(targets.shape, generator=torch.Generator().manual_seed(2)) < 0.5
    seen_tokens = []

    def project(hidden: torch.Tensor) -> torch.Tensor:
        seen_tokens.append(hidden.shape[:-1].numel())
        return head(hidden)

    selected = token_logprobs_at(states, targets, positions, project=project, token_logprobs=full_vocab_logprobs,
                                 chunk_tokens=chunk_tokens, dim=1)
    weights = torch.randn(targets.shape, generator=torch.Generator().manual_seed(1))
    (selected * weights).sum().backward()
    selected_grads = states.grad.clone(), head.weight.grad.clone()
    states.grad, head.weight.grad = None, None
    projected_forward = sum(seen_tokens[: len(seen_tokens) // (2 if chunk_tokens == 2 else 1)])

    naive = _naive(states, head, targets)
    (naive * weights * positions).sum().backward()  # the loss reads the selected positions only
    torch.testing.assert_close(selected, torch.where(positions, naive, torch.zeros_like(naive)), rtol=0, atol=1e-5)
    torch.testing.assert_close(selected_grads[0], states.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(selected_grads[1], head.weight.grad, rtol=1e-5, atol=1e-6)
    assert projected_forward == int(positions.sum())  # the other positions never reach the output projection


def test_no_positions_means_every_position() -> None:
    states, head, targets = _case(vocab=13, rows=2, length=5)
    everything = token_logprobs_at(states.detach(), targets, None, project=head, token_logprobs=full_vocab_logprobs,
                                   chunk_tokens=4, dim=1)
    torch.testing.assert_close(everything, _naive(states.detach(), head, targets), rtol=0, atol=1e-5)
