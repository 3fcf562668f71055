"""The reference policy as a CPU copy of the initial weights, swapped into the live model on demand.

NeMo-RL's choice: no second model in accelerator memory; the KL term's reference logprobs are computed by copying
the initial weights into the parameters in place, running the forward pass, and copying the current weights back.
Shared by the HF policy and every Megatron rank (each holds its own shard).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch

NamedParameters = Callable[[], Iterable[tuple[str, torch.nn.Parameter]]]


def cpu_snapshot(named_parameters: NamedParameters) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().to("cpu", copy=True) for name, parameter in named_parameters()}


def maybe_snapshot_reference(reference_policy: str, named_parameters: NamedParameters) -> dict[str, torch.Tensor] | None:
    """`policy.reference_policy`: cpu_copy keeps the initial weights on CPU; none keeps nothing."""
    match reference_policy:
        case "none":
            return None
        case "cpu_copy":
            return cpu_snapshot(named_parameters)
        case _:
            raise ValueError(f"policy.reference_policy must be cpu_copy|none, got {reference_policy!r}")


@contextlib.contextmanager
def weights_swapped_in(named_parameters: NamedParameters, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Run the body with `weights` in the parameters; the current weights are restored exactly afterwards."""
    current = cpu_snapshot(named_parameters)
    _copy_into(named_parameters, weights)
    try:
        yield
    finally:
        _copy_into(named_parameters, current)


@torch.no_grad()
def _copy_into(named_parameters: NamedParameters, weights: dict[str, torch.Tensor]) -> None:
    for name, parameter in named_parameters():
        parameter.copy_(weights[name])
