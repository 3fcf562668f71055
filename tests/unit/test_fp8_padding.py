"""The Megatron worker pads both micro-batch paths to TP x the FP8 token multiple when FP8 training is on
(issue 16, item 4). The worker's batch building runs here without a model: parallel_state's sizes are stubbed."""

from pathlib import Path

import pytest
import torch
from megatron.core import parallel_state

from cipo_nemo.config import load_config
from cipo_nemo.data.batch import Batch
from cipo_nemo.models.policy.megatron_worker import MegatronPolicyWorker

BASE_CONFIG = Path(__file__).resolve().parents[2] / "conf" / "cipo_base.yaml"
LENGTHS = [37, 5, 91, 13]  # odd lengths: no row is a multiple of 16 by accident


def odd_length_batch(width: int = 100) -> Batch:
    n = len(LENGTHS)
    input_ids = torch.zeros(n, width, dtype=torch.long)
    prompt_mask = torch.zeros(n, width, dtype=torch.bool)
    response_mask = torch.zeros(n, width, dtype=torch.bool)
    for i, length in enumerate(LENGTHS):
        input_ids[i, :length] = torch.arange(1, length + 1)
        prompt_mask[i, :2] = True
        response_mask[i, 2:length] = True
    return Batch({"group_id": torch.arange(n), "sample_kind": ["base"] * n, "input_ids": input_ids,
                  "prompt_mask": prompt_mask, "response_mask": response_mask})


def worker_without_model(monkeypatch, *, fp8: str | None, recipe: str, packing: bool, tp: int = 2):
    overrides = [f"policy.megatron.fp8_recipe={recipe}", f"policy.sequence_packing={str(packing).lower()}",
                 "policy.max_total_sequence_length=100", "policy.megatron.layer_spec=transformer_engine"]
    if fp8 is not None:
        overrides.append(f"policy.megatron.fp8={fp8}")
    worker = object.__new__(MegatronPolicyWorker)
    worker._policy = load_config(BASE_CONFIG, overrides).policy
    worker._layer_spec = "transformer_engine"
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_world_size", lambda: tp)
    monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_world_size", lambda: 1)
    return worker


@pytest.mark.parametrize(("recipe", "multiple"), [("delayed", 32), ("mxfp8", 64), ("blockwise", 256)])
@pytest.mark.parametrize("packing", [False, True])
def test_fp8_micro_batches_are_padded_to_tp_times_the_recipe_multiple(monkeypatch, recipe, multiple, packing):
    worker = worker_without_model(monkeypatch, fp8="e4m3", recipe=recipe, packing=packing)
    micro_batches = worker._build_micro_batches(odd_length_batch(), micro_batch_size=2)
    widths = [micro_batch.input_ids.shape[1] for micro_batch in micro_batches]
    assert widths and all(width % multiple == 0 for width in widths), widths
    if packing:  # the THD boundaries end at the padded width: the padding is a segment of its own
        assert [int(mb.packed_seq_params.cu_seqlens_q[-1]) for mb in micro_batches] == widths


@pytest.mark.parametrize("packing", [False, True])
def test_without_fp8_rows_stay_a_multiple_of_tp_only(monkeypatch, packing):
    worker = worker_without_model(monkeypatch, fp8=None, recipe="blockwise", packing=packing)
    widths = [mb.input_ids.shape[1] for mb in worker._build_micro_batches(odd_length_batch(), micro_batch_size=2)]
    # packed: 146 real tokens; unpacked: each micro-batch of 2 to its own longest (37 -> 38, 91 -> 92): TP 2 only
    assert widths == ([146] if packing else [38, 92]), widths
