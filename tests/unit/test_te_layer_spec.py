"""The Transformer Engine layer spec builds the output layer megatron-core can run (issue 25, item 2).

megatron-bridge's GPTModelProvider turns `gradient_accumulation_fusion` on whenever `transformer_engine.pytorch`
imports (bridge utils/fusions.py:34-53), and GPTModel's output layer is megatron-core's own ColumnParallelLinear,
which raises at construction without APEX's `fused_weight_gradient_mlp_cuda` (core tensor_parallel/layers.py:1070).
Transformer Engine cannot be imported here, so a stand-in module plays "TE imports" for the bridge; the layer that
must accept the resulting config is megatron-core's real ColumnParallelLinear.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch.distributed as dist

from cipo_nemo.models.policy.cpu_compat import prepare_megatron_imports
from cipo_nemo.models.policy.megatron_setup import apex_gradient_accumulation_fusion_available, apply_layer_spec


@pytest.fixture
def provider_as_on_a_te_install(monkeypatch):
    """A GPTModelProvider built while `import transformer_engine.pytorch` succeeds, as on a GPU install."""
    prepare_megatron_imports()
    from megatron.bridge.models.gpt_provider import GPTModelProvider

    package, pytorch = types.ModuleType("transformer_engine"), types.ModuleType("transformer_engine.pytorch")
    package.pytorch = pytorch
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "transformer_engine", package)
        patch.setitem(sys.modules, "transformer_engine.pytorch", pytorch)
        provider = GPTModelProvider(num_layers=2, hidden_size=64, num_attention_heads=4)
    provider.use_cpu_initialization, provider.perform_initialization = True, False
    return provider


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.new_group([0])
    finally:
        dist.destroy_process_group()


def build_output_layer(config, group):
    """GPTModel's output layer as megatron-core 0.19.2 builds it (models/gpt/gpt_model.py:264-285)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    return ColumnParallelLinear(config.hidden_size, 128, config=config, init_method=None, bias=False,
                                gather_output=False, tp_group=group)


def test_bridge_default_makes_megatron_core_refuse_the_output_layer(provider_as_on_a_te_install, one_rank_group):
    """The finding itself: what the provider carries out of the bridge is rejected without APEX."""
    assert provider_as_on_a_te_install.gradient_accumulation_fusion is True
    with pytest.raises(RuntimeError, match="fused_weight_gradient_mlp_cuda"):
        build_output_layer(provider_as_on_a_te_install, one_rank_group)


def test_te_layer_spec_builds_an_output_layer_megatron_core_accepts(provider_as_on_a_te_install, one_rank_group):
    assert not apex_gradient_accumulation_fusion_available()  # no APEX on this machine
    apply_layer_spec(provider_as_on_a_te_install, layer_spec="transformer_engine", local_core_attention="sdpa")
    assert provider_as_on_a_te_install.transformer_impl == "transformer_engine"
    assert provider_as_on_a_te_install.gradient_accumulation_fusion is False
    build_output_layer(provider_as_on_a_te_install, one_rank_group)  # raised before the fix


def test_te_layer_spec_keeps_the_fusion_where_apex_provides_it(provider_as_on_a_te_install, monkeypatch):
    apex_extension = "fused_weight_gradient_mlp_cuda"
    monkeypatch.setitem(sys.modules, apex_extension, types.ModuleType(apex_extension))
    provider_as_on_a_te_install.gradient_accumulation_fusion = False
    apply_layer_spec(provider_as_on_a_te_install, layer_spec="transformer_engine", local_core_attention="sdpa")
    assert provider_as_on_a_te_install.gradient_accumulation_fusion is True
