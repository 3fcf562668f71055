"""SDPACoreAttention (cipo_nemo/models/policy/sdpa_attention.py) against megatron-core's DotProductAttention on
random inputs, forward and backward: causal, GQA, a block-diagonal (packed) mask; in a one-rank gloo world."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from multirank import run_on_ranks

pytestmark = pytest.mark.slow  # Megatron ranks (gloo)

CASES = {  # name: (heads, query groups, mask)
    "causal": (4, 4, "causal"),
    "gqa_causal": (4, 2, "causal"),
    "mqa_causal": (4, 1, "causal"),
    "gqa_block_mask": (4, 2, "block"),
}


def _attention_pair(heads: int, groups: int) -> tuple[Any, Any]:
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from cipo_nemo.models.policy.sdpa_attention import SDPACoreAttention

    config = TransformerConfig(num_layers=2, hidden_size=32 * heads, num_attention_heads=heads,
                               num_query_groups=groups, kv_channels=32, attention_dropout=0.0, hidden_dropout=0.0,
                               masked_softmax_fusion=False, use_cpu_initialization=True)
    arguments = {"config": config, "layer_number": 2, "attn_mask_type": AttnMaskType.causal,
                 "attention_type": "self"}
    return DotProductAttention(**arguments), SDPACoreAttention(**arguments)


def _block_causal_mask(length: int, boundaries: list[int]) -> torch.Tensor:
    """(1, 1, S, S), True = blocked: causal within each packed sample, nothing across samples."""
    segment = torch.zeros(length, dtype=torch.long)
    for boundary in boundaries:
        segment[boundary:] += 1
    allowed = (segment[:, None] == segment[None, :]) & torch.ones(length, length, dtype=torch.bool).tril()
    return ~allowed[None, None]


def compare_ranks(rank: int, world_size: int) -> dict[str, dict[str, float]]:
    from cipo_nemo.config import load_config
    from cipo_nemo.models.policy.megatron_setup import init_parallel_state
    from policy_cases import BASE_CONFIG

    init_parallel_state(megatron_cfg=load_config(BASE_CONFIG, []).policy.megatron, seed=0)
    generator = torch.Generator().manual_seed(0)
    results = {}
    for name, (heads, groups, mask_kind) in CASES.items():
        megatron_attention, sdpa_attention = _attention_pair(heads, groups)
        length, batch = 12, 3
        query = torch.randn(length, batch, heads, 32, generator=generator)
        key, value = (torch.randn(length, batch, groups, 32, generator=generator) for _ in range(2))
        mask = _block_causal_mask(length, [5, 9]) if mask_kind == "block" else None
        grad_output = torch.randn(length, batch, heads * 32, generator=generator)
        outputs, grads = [], []
        for attention in (megatron_attention, sdpa_attention):
            inputs = [tensor.clone().requires_grad_() for tensor in (query, key, value)]
            output = attention(*inputs, mask)
            output.backward(grad_output)
            outputs.append(output.detach())
            grads.append([tensor.grad for tensor in inputs])
        results[name] = {
            "output_diff": float((outputs[0] - outputs[1]).abs().max()),
            "output_scale": float(outputs[0].abs().max()),
            "grad_diff": max(float((a - b).abs().max()) for a, b in zip(*grads)),
            "shape_equal": outputs[0].shape == outputs[1].shape == (length, batch, heads * 32),
        }
    return results


def test_sdpa_core_attention_equals_megatron_dot_product_attention() -> None:
    results = run_on_ranks(compare_ranks, world_size=1)[0]
    assert set(results) == set(CASES)
    for name, result in results.items():
        assert result["shape_equal"], name
        assert result["output_scale"] > 0.1, name
        assert result["output_diff"] < 1e-5, (name, result)
        assert result["grad_diff"] < 1e-5, (name, result)
