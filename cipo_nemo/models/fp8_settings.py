"""FP8 across the trainer and the sampler: what the GPU generation allows, and whether vLLM's online FP8 scales as
the Transformer Engine recipe the policy trains with. The launch plan (cipo_nemo/plan.py) reports both."""

from __future__ import annotations

from cipo_nemo.config import MasterConfig


def check_precision(cfg: MasterConfig) -> list[str]:
    """FP8 against the GPU generation: FP8 GEMMs need Hopper or newer, MXFP8 (32-element block scales in hardware)
    needs Blackwell; Transformer Engine would refuse the recipe only when the first FP8 layer runs."""
    arch, megatron = cfg.cluster.gpu_arch, cfg.policy.megatron
    if arch is None or cfg.policy.backend != "megatron" or megatron.fp8 is None:
        return []
    if arch == "ampere":
        return [f"policy.megatron.fp8 is {megatron.fp8!r} but cluster.gpu_arch is 'ampere': FP8 needs Hopper or "
                "Blackwell GPUs; set policy.megatron.fp8=null"]
    if megatron.fp8_recipe == "mxfp8" and arch != "blackwell":
        return [f"policy.megatron.fp8_recipe is 'mxfp8' but cluster.gpu_arch is {arch!r}: MXFP8 needs Blackwell GPUs; "
                "use fp8_recipe blockwise (or tensorwise / delayed) on Hopper"]
    return []


# vLLM 0.32's online FP8 (config/quantization.py:193-200, quantization/online/fp8.py:307-318) and the TE recipe
# that scales the same way
VLLM_FP8_SCALING = {"fp8_per_block": ("128x128 weight blocks, 1x128 activation groups", "blockwise"),
                    "fp8_per_tensor": ("one scale per tensor", "tensorwise")}


def engine_fp8_scaling(cfg: MasterConfig) -> str:
    """The engine's FP8 scaling, and whether it is the scaling the policy trains with."""
    scaling, recipe = VLLM_FP8_SCALING[cfg.generation.vllm.quantization]
    megatron = cfg.policy.megatron
    if cfg.policy.backend != "megatron" or megatron.fp8 is None:
        return f"FP8 {cfg.generation.vllm.quantization} ({scaling}; the policy trains in {cfg.policy.precision})"
    same = megatron.fp8_recipe == recipe or (recipe == "tensorwise" and megatron.fp8_recipe == "delayed")
    return (f"FP8 {cfg.generation.vllm.quantization} ({scaling}: {'the same' if same else 'NOT the same'} scaling as "
            f"the trainer's {megatron.fp8_recipe} FP8)")
