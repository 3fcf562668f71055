"""bf16 training on a CPU that multiplies bf16 in hardware (`policy.cpu_bf16`): both policies really compute in
bf16 (their logprobs move off the fp32 ones, by no more than bf16's rounding), train a finite step, and without the
switch, or on a CPU without avx512_bf16/amx_bf16, stay in fp32."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from multirank import run_on_ranks
from policy_cases import LOSS, make_batch, make_policy
from transformers import AutoTokenizer

from cipo_nemo.config.schema import PolicyConfig
from cipo_nemo.data.batch import Batch
from cipo_nemo.models.policy import megatron_setup
from cipo_nemo.models.policy.hf_policy import HFPolicy
from cipo_nemo.models.policy.megatron_setup import cpu_has_native_bf16, resolve_param_dtype
from cipo_nemo.models.tiny import build_tiny_model_dir

pytestmark = pytest.mark.slow  # Megatron ranks (gloo)

BF16_LOGPROB_TOLERANCE = 0.1  # bf16 keeps 8 bits of mantissa: logits of a tiny random model move by ~1e-2

needs_native_bf16 = pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no avx512_bf16/amx_bf16")


@pytest.mark.parametrize(("precision", "switch", "native", "expected"), [
    ("fp32", True, True, torch.float32),
    ("bf16", False, True, torch.float32),  # the default: CPU runs keep fp32 unless asked
    ("bf16", True, False, torch.float32),  # emulated bf16 would be slower than fp32
    ("bf16", True, True, torch.bfloat16),
])
def test_cpu_precision_follows_the_switch_and_the_hardware(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                         precision: str, switch: bool, native: bool,
                                                         expected: torch.dtype) -> None:
    monkeypatch.setattr(megatron_setup, "cpu_has_native_bf16", lambda: native)
    policy = make_policy(tmp_path, precision=precision, cpu_bf16=switch)
    assert resolve_param_dtype(policy) == expected


@pytest.fixture(scope="module")
def model_and_batch(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Batch]:
    model_dir = build_tiny_model_dir(tmp_path_factory.mktemp("bf16") / "llama")
    return model_dir, make_batch(vocab_size=len(AutoTokenizer.from_pretrained(model_dir)))


def _bf16(policy: PolicyConfig) -> PolicyConfig:
    return policy.model_copy(update={"precision": "bf16", "cpu_bf16": True})


def _assert_bf16_close(bf16: torch.Tensor, fp32: torch.Tensor, mask: torch.Tensor) -> None:
    difference = (bf16 - fp32)[mask].abs()
    assert 0 < difference.max() < BF16_LOGPROB_TOLERANCE, difference.max()


@needs_native_bf16
def test_hf_policy_computes_in_bf16_with_fp32_master_weights(model_and_batch: tuple[Path, Batch]) -> None:
    model_dir, batch = model_and_batch
    fp32 = HFPolicy(policy=make_policy(model_dir), num_steps=2, seed=0)
    bf16 = HFPolicy(policy=_bf16(make_policy(model_dir)), num_steps=2, seed=0)
    _assert_bf16_close(bf16.get_logprobs(batch), fp32.get_logprobs(batch), batch["response_mask"])
    before = {name: p.detach().clone() for name, p in bf16.model.named_parameters()}
    step = bf16.train(batch, LOSS)
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # Adam's master copy stays fp32
    assert torch.isfinite(torch.tensor([step["loss"], step["grad_norm"]])).all()
    assert any(not torch.equal(before[name], p) for name, p in bf16.model.named_parameters())


def megatron_bf16_checks(rank: int, world_size: int, fp32: PolicyConfig, bf16: PolicyConfig,
                         batch: Batch) -> dict[str, Any]:
    from cipo_nemo.models.policy.megatron_worker import MegatronPolicyWorker

    out: dict[str, Any] = {}
    out["fp32_logprobs"] = MegatronPolicyWorker(policy=fp32, num_steps=2, seed=0).get_logprobs(batch)
    worker = MegatronPolicyWorker(policy=bf16, num_steps=2, seed=0)
    out["bf16_logprobs"] = worker.get_logprobs(batch)
    out["param_dtypes"] = sorted({str(p.dtype) for chunk in worker._chunks for p in chunk.parameters()})
    before = worker.export_hf_weights()
    out["step"] = worker.train(batch, LOSS, global_denominator=float(batch["response_mask"].sum()))
    after = worker.export_hf_weights()
    out["changed"] = sum(not torch.equal(before[name], after[name]) for name in before)
    return out


@needs_native_bf16
def test_megatron_policy_trains_in_bf16_on_cpu(model_and_batch: tuple[Path, Batch]) -> None:
    model_dir, batch = model_and_batch
    fp32 = make_policy(model_dir, micro_batch_size=2, logprob_micro_batch_size=4)
    (out,) = run_on_ranks(megatron_bf16_checks, world_size=1, args=(fp32, _bf16(fp32), batch))
    assert out["param_dtypes"] == ["torch.bfloat16"]
    _assert_bf16_close(out["bf16_logprobs"], out["fp32_logprobs"], batch["response_mask"])
    assert torch.isfinite(torch.tensor([out["step"]["loss"], out["step"]["grad_norm"]])).all()
    assert out["changed"] > 0
