"""The refit manifest of a quantized (FP8) vLLM engine: checkpoint-format names only (issue 16, item 3)."""

import pytest

from cipo_nemo.models.refit.manifest import WeightSyncError, build_weight_manifest

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def fp8_engine_parameters(num_layers: int = 2) -> list[str]:
    """`named_parameters()` of a Llama engine under vLLM's online FP8: every linear has a `weight_scale` beside its
    (FP8) `weight`; norms, embedding and output layer are not quantized."""
    names = ["model.embed_tokens.weight"]
    for layer in range(num_layers):
        prefix = f"model.layers.{layer}"
        names += [f"{prefix}.input_layernorm.weight", f"{prefix}.post_attention_layernorm.weight"]
        names += [f"{prefix}.{linear}.{part}" for linear in LINEARS for part in ("weight", "weight_scale")]
    return names + ["model.norm.weight", "lm_head.weight"]


def exported_hf_names(num_layers: int = 2) -> set[str]:
    """What megatron-bridge exports for the same model: HF names, bf16 weights, no scales."""
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for layer in range(num_layers):
        prefix = f"model.layers.{layer}"
        names |= {f"{prefix}.input_layernorm.weight", f"{prefix}.post_attention_layernorm.weight"}
        names |= {f"{prefix}.self_attn.{p}_proj.weight" for p in ("q", "k", "v", "o")}
        names |= {f"{prefix}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    return names


def test_fp8_engine_manifest_accepts_the_bf16_export_and_counts_weights_only():
    manifest = build_weight_manifest(parameter_names=fp8_engine_parameters(), packed_modules=PACKED,
                                     tie_word_embeddings=False, quantized=True)
    manifest.check_names(exported_hf_names())  # raised "missing ... weight_scale" before the fix
    # embed + norm + lm_head + per layer 2 norms + 4 linear weights; the 8 scales are recomputed by the reload
    assert manifest.num_parameters == 3 + 2 * (2 + 4)
    assert not any(name.endswith("_scale") for name in manifest.sources)
    assert manifest.stale_parameters(exported_hf_names()) == []
    # a weight really missing from the export is still caught, naming the fused engine parameter
    with pytest.raises(WeightSyncError, match=r"k_proj\.weight.*qkv_proj\.weight"):
        manifest.check_names(exported_hf_names() - {"model.layers.1.self_attn.k_proj.weight"})


def test_unquantized_engine_keeps_every_parameter_even_one_named_like_a_scale():
    names = ["model.embed_tokens.weight", "model.layers.0.layer_scale", "model.layers.0.mlp.down_proj.weight_scale"]
    manifest = build_weight_manifest(parameter_names=names, packed_modules={}, tie_word_embeddings=True)
    assert sorted(manifest.sources) == sorted(names)
    with pytest.raises(WeightSyncError, match="weight_scale"):
        manifest.check_names({"model.embed_tokens.weight", "model.layers.0.layer_scale"})
