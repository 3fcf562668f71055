"""Torch's AdamW steps with its fused CPU kernel where that is the same update (fp32 CPU parameters)."""

from __future__ import annotations

import torch

from cipo_nemo.models.policy.megatron_setup import use_fused_adam_on_cpu


def _parameters(dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    parameters = [torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in ((64, 32), (32,))]
    for parameter in parameters:
        parameter.grad = torch.randn(parameter.shape, generator=generator).to(dtype)
    return parameters


def _adamw(parameters: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    return torch.optim.AdamW([{"params": parameters[:1], "weight_decay": 0.1}, {"params": parameters[1:],
                              "weight_decay": 0.0}], lr=1e-2)


def test_fp32_cpu_adam_is_fused_and_takes_the_single_tensor_step() -> None:
    single, fused = _parameters(), _parameters()
    single_adam, fused_adam = _adamw(single), _adamw(fused)
    assert use_fused_adam_on_cpu(fused_adam)
    assert [group["fused"] for group in fused_adam.param_groups] == [True, True]
    assert [group["fused"] for group in single_adam.param_groups] == [None, None]  # torch's CPU default
    for _ in range(3):
        single_adam.step()
        fused_adam.step()
    for a, b in zip(single, fused, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
    assert (single[0] - _parameters()[0]).abs().max() > 1e-3  # the steps moved the weights


def test_other_parameters_and_optimizers_are_left_alone() -> None:
    bf16 = _adamw(_parameters(torch.bfloat16))
    assert not use_fused_adam_on_cpu(bf16)
    assert [group["fused"] for group in bf16.param_groups] == [None, None]
    assert not use_fused_adam_on_cpu(torch.optim.SGD(_parameters(), lr=0.1))
