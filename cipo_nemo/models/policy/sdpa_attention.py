"""Core attention for megatron's local (non-Transformer-Engine) layer spec on torch's fused SDPA kernels.

megatron-core's `DotProductAttention` (transformer/dot_product_attention.py) materializes the [b, heads, sq, sk]
score matrix, masks it, softmaxes it and multiplies by V: unfused, it ran the local spec at 0.62x the tokens/s of
HF + SDPA on an H200 (docs/notes/attention_and_logprob_memory.md). `SDPACoreAttention` takes the same
constructor and forward arguments (a layer spec's `core_attention` submodule) and calls
`torch.nn.functional.scaled_dot_product_attention`, which picks flash / memory-efficient kernels on GPU and a
fused flash kernel on CPU:

    context = softmax(scale * Q K^T + mask) V,   per head, with K and V shared by each group of query heads (GQA)

Layouts: query [sq, b, heads, d], key/value [sk, b, groups, d] in, [sq, b, heads * d] out, as megatron's.
Masks: megatron's boolean `attention_mask` is True where attention is *blocked* (the packed rows' block-diagonal
mask); SDPA's boolean mask is True where it is *allowed*. With no mask and a causal mask type, SDPA's `is_causal`.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPACoreAttention(DotProductAttention):
    """DotProductAttention's interface and settings (scale, heads per TP rank, dropout), SDPA's kernels.

    Subclassing keeps megatron's constructor: it computes the per-partition head counts and the softmax scale and
    checks the config the same way. What SDPA cannot express is refused at construction, not silently changed."""

    def __init__(self, config: Any, layer_number: int, attn_mask_type: Any, attention_type: str,
                 **kwargs: Any) -> None:
        super().__init__(config, layer_number, attn_mask_type, attention_type, **kwargs)
        if self.softmax_offset is not None:
            raise ValueError(f"SDPACoreAttention supports softmax_type 'vanilla' only, not {config.softmax_type!r}")
        if self.scale_mask_softmax.window_size is not None:
            raise ValueError("SDPACoreAttention has no sliding-window attention (config.window_size is set)")
        # megatron divides the scale by the layer number here and multiplies the scores back in its softmax
        self.sdpa_scale = self.softmax_scale * (self.layer_number if config.apply_query_key_layer_scaling else 1)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: Any = None,
                attention_bias: torch.Tensor | None = None, packed_seq_params: Any = None) -> torch.Tensor:
        if packed_seq_params is not None:
            raise ValueError("SDPACoreAttention takes packed rows as a block-diagonal attention_mask, not "
                             "PackedSeqParams (THD needs Transformer Engine)")
        if attention_bias is not None:
            raise ValueError("SDPACoreAttention takes no attention_bias")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        sq, sk = query.shape[0], key.shape[0]
        is_causal = attention_mask is None and mask_type == AttnMaskType.causal and sq > 1
        if is_causal and sq != sk:
            raise ValueError(f"causal self-attention needs as many queries as keys, got {sq} and {sk}")
        allowed = None if attention_mask is None else ~attention_mask.bool()
        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (tensor.permute(1, 2, 0, 3) for tensor in (query, key, value))
        dropout = self.attention_dropout.p if self.training else 0.0
        rng = (tensor_parallel.get_cuda_rng_tracker().fork()
               if dropout > 0 and not self.config.sequence_parallel else contextlib.nullcontext())
        with rng:
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, dropout_p=dropout, is_causal=is_causal, scale=self.sdpa_scale,
                enable_gqa=k.shape[1] != q.shape[1],
            )
        # [b, heads, sq, d] -> [sq, b, heads * d]
        return context.permute(2, 0, 1, 3).reshape(sq, query.shape[1], self.hidden_size_per_partition)


def sdpa_local_layer_spec(config: Any) -> Any:
    """megatron-bridge's local layer spec (`local_layer_spec`) with `SDPACoreAttention` as core attention."""
    from megatron.bridge.models.gpt_provider import local_layer_spec

    spec = copy.deepcopy(local_layer_spec(config))
    attention = spec.submodules.self_attention
    attention.submodules.core_attention = SDPACoreAttention
    return spec
