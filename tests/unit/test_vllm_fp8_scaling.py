"""The FP8 sampler scales as the FP8 trainer does (issue 25, item 2).

The 70B FP8 preset trains with Transformer Engine's blockwise recipe (128x128 weight blocks, 1x128 activation
groups). vLLM 0.32 reads `quantization="fp8"` as per-tensor online FP8 (model_loader/weight_utils.py:351-357), so
the engine asked for that sampled with one scale per tensor. What the engine is asked for is resolved here by vLLM's
own resolver and dispatch table (the engine itself needs a GPU).
"""

from pathlib import Path

import pytest
from vllm.config.quantization import resolve_quantization_config
from vllm.model_executor.layers.quantization.online.base import _ONLINE_LINEAR_METHODS
from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape

from cipo_nemo.config import ConfigError, load_config
from cipo_nemo.models.generation.vllm_generation import build_engine_kwargs
from cipo_nemo.plan import plan_launch

CONF = Path(__file__).resolve().parents[2] / "conf"
FP8_PRESET = CONF / "cipo_llama3_70b_math_fp8.yaml"


def linear_scaling(quantization: str | None) -> tuple[GroupShape, GroupShape] | None:
    """(weight scale group, activation scale group) of the linear layers vLLM builds for this `quantization`."""
    resolved = resolve_quantization_config(quantization, None)
    if resolved is None:
        return None
    method = _ONLINE_LINEAR_METHODS[resolved.linear.weight]
    return resolved.linear.weight.scale.group_shape, method.activation_quant_key.scale.group_shape


def engine_quantization(cfg) -> str | None:
    kwargs = build_engine_kwargs(model_dir="/m", vllm=cfg.generation.vllm, colocated=True, max_model_len=4096,
                                 seed=0, on_gpu=True)
    return kwargs["quantization"]


def test_fp8_preset_asks_vllm_for_the_trainers_block_scales():
    cfg = load_config(FP8_PRESET)
    assert cfg.policy.megatron.fp8_recipe == "blockwise"
    assert linear_scaling(engine_quantization(cfg)) == (GroupShape(128, 128), GroupShape(1, 128))


def test_a_bare_fp8_is_read_as_block_scaling_not_vllms_per_tensor():
    cfg = load_config(FP8_PRESET, ["generation.vllm.quantization=fp8"])
    assert cfg.generation.vllm.quantization == "fp8_per_block"
    assert linear_scaling(engine_quantization(cfg))[0] == GroupShape(128, 128)
    assert linear_scaling("fp8") is None  # vLLM's resolver leaves "fp8" to the per-tensor fallback


def test_per_tensor_stays_available_and_other_names_are_refused():
    cfg = load_config(FP8_PRESET, ["generation.vllm.quantization=fp8_per_tensor"])
    assert linear_scaling(engine_quantization(cfg))[0] == GroupShape.PER_TENSOR
    with pytest.raises(ConfigError, match="generation.vllm.quantization"):
        load_config(FP8_PRESET, ["generation.vllm.quantization=int8"])


@pytest.mark.parametrize(
    ("quantization", "recipe", "says"),
    [("fp8_per_block", "blockwise", "128x128 weight blocks, 1x128 activation groups: the same scaling as the "
                                    "trainer's blockwise FP8"),
     ("fp8_per_tensor", "blockwise", "one scale per tensor: NOT the same scaling as the trainer's blockwise FP8"),
     ("fp8_per_tensor", "delayed", "one scale per tensor: the same scaling as the trainer's delayed FP8")],
)
def test_dry_run_says_which_scaling_the_engine_uses(quantization, recipe, says):
    cfg = load_config(FP8_PRESET, [f"generation.vllm.quantization={quantization}",
                                   f"policy.megatron.fp8_recipe={recipe}"])
    (generation,) = [line for line in plan_launch(cfg, base_samples=8, max_correction_samples=0).lines()
                     if line.startswith("generation:")]
    assert f"FP8 {quantization} ({says})" in generation
