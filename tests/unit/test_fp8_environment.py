"""NVTE_FP8_BLOCK_SCALING_FP32_SCALES reaches the policy actors from their start (issue 16, item 6).

Transformer Engine reads it into `Float8BlockScaling`'s class defaults at import, so it must be in the actors'
runtime environment; setting it while the model is built (the old code) came after TE's import.
"""

from pathlib import Path

import pytest
import torch

from cipo_nemo.config import load_config
from cipo_nemo.models import factory
from cipo_nemo.models.policy import megatron_policy
from cipo_nemo.models.policy.megatron_setup import fp8_process_environment

BASE_CONFIG = Path(__file__).resolve().parents[2] / "conf" / "cipo_base.yaml"
VARIABLE = "NVTE_FP8_BLOCK_SCALING_FP32_SCALES"
HOPPER, BLACKWELL = (9, 0), (10, 0)


def megatron_config(*overrides: str):
    return load_config(BASE_CONFIG, ["policy.megatron.layer_spec=transformer_engine", *overrides]).policy.megatron


@pytest.mark.parametrize(
    ("overrides", "capability", "expected"),
    [
        (["policy.megatron.fp8=e4m3", "policy.megatron.fp8_recipe=blockwise"], HOPPER, {VARIABLE: "1"}),
        (["policy.megatron.fp8=e4m3", "policy.megatron.fp8_recipe=blockwise"], BLACKWELL, {}),  # MXFP8 emulation
        (["policy.megatron.fp8=e4m3", "policy.megatron.fp8_recipe=blockwise"], None, {}),  # no GPU
        (["policy.megatron.fp8=hybrid", "policy.megatron.fp8_recipe=delayed"], HOPPER, {}),
        (["policy.megatron.fp8_recipe=blockwise"], HOPPER, {}),  # fp8 off
    ],
)
def test_fp32_block_scales_only_for_blockwise_fp8_on_hopper(overrides, capability, expected):
    assert fp8_process_environment(megatron_config(*overrides), device_capability=capability) == expected


class RecordingPolicy:
    """Stands in for MegatronPolicy: records the environment the policy's actors would be started with."""

    seen: dict = {}

    def __init__(self, **kwargs) -> None:
        RecordingPolicy.seen = kwargs


def test_policy_actors_are_started_with_the_variable_on_hopper(monkeypatch, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    cfg = load_config(BASE_CONFIG, [f"policy.model_name={tmp_path}", "policy.backend=megatron",
                                    "policy.megatron.layer_spec=transformer_engine", "policy.megatron.fp8=e4m3",
                                    "policy.megatron.fp8_recipe=blockwise"])
    monkeypatch.setattr(megatron_policy, "MegatronPolicy", RecordingPolicy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: HOPPER)
    factory.build_policy(cfg, cluster=None)
    assert RecordingPolicy.seen["env_vars"][VARIABLE] == "1"
    assert "OMP_NUM_THREADS" in RecordingPolicy.seen["env_vars"]  # the usual worker variables stay
