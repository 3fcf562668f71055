"""MegatronPolicyWorker on tiny random Llama (untied) and Qwen2 (tied) models over gloo, checked against HFPolicy.

Four multi-rank runs, each a module fixture that checks several things at once (imports dominate their cost):
  single: 1 rank   - logprobs, train step, 1 vs 4 micro-batches (and plain vs distributed optimizer), export
                     round trip, reference policy, sequence packing, import shims, configuration errors
  tp2:    2 ranks  - TP=2 logprobs and train step (also packed); checkpoint after step 1, step 2; save_hf
  pp2:    2 ranks  - PP=2 logprobs and train step (also packed); loads tp2's checkpoint, step 2 again
  dp2:    2 ranks  - DP=2 (+ activation recompute) train step on the same global batch, sharded by tokens
"""

from __future__ import annotations

import contextlib
import os
import sys
import typing
from dataclasses import dataclass
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from multirank import run_on_ranks
from policy_cases import (
    LOSS,
    STEP_WEIGHT_TOLERANCE,
    make_batch,
    make_policy,
    max_abs_diff,
    max_weight_diff,
    skip_plans,
    with_zero_advantages,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from cipo_nemo.config.schema import PolicyConfig
from cipo_nemo.data.batch import Batch
from cipo_nemo.data.packing import plan_packed_rows, sequence_lengths
from cipo_nemo.models.refit.shm_file import load_refit_file
from cipo_nemo.models.policy.hf_policy import HFPolicy
from cipo_nemo.models.policy.megatron_policy import with_inert_padding
from cipo_nemo.models.policy.microbatches import plan_mini_batches, take_optimizer_steps
from cipo_nemo.models.tiny import build_tiny_model_dir

pytestmark = pytest.mark.slow  # Megatron ranks (gloo, Ray)

LOGPROB_TOLERANCE = 1e-4
ODD_LENGTH_ROWS = [1, 3, 4, 7]  # make_batch's samples of 10, 11, 11 and 7 tokens
MODELS = ("llama", "qwen2_tied")


@dataclass
class HFReference:
    """HFPolicy on the same checkpoint and batch: the expected numbers."""

    model_dir: Path
    batch: Batch
    initial_logprobs: torch.Tensor
    initial_weights: dict[str, torch.Tensor]
    step: dict[str, float]
    stepped_logprobs: torch.Tensor


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, HFReference]:
    root = tmp_path_factory.mktemp("megatron_policy_models")
    model_dirs = {
        "llama": build_tiny_model_dir(root / "llama", architecture="llama"),
        "qwen2_tied": build_tiny_model_dir(root / "qwen2", architecture="qwen2", tie_word_embeddings=True),
    }
    return {name: _hf_reference(model_dir) for name, model_dir in model_dirs.items()}


def _hf_reference(model_dir: Path) -> HFReference:
    batch = make_batch(vocab_size=len(AutoTokenizer.from_pretrained(model_dir)))
    # the whole micro-batch's logits at once, against Megatron's chunks of 10 tokens (`_policy`)
    policy = HFPolicy(policy=make_policy(model_dir, logprob_chunk_tokens=0), num_steps=4, seed=0)
    initial_logprobs = policy.get_logprobs(batch)
    initial_weights = dict(policy.export_hf_weights())
    step = policy.train(batch, LOSS)
    return HFReference(model_dir, batch, initial_logprobs, initial_weights, step, policy.get_logprobs(batch))


def _policy(reference: HFReference, **megatron: Any) -> PolicyConfig:
    return make_policy(reference.model_dir, micro_batch_size=2, logprob_micro_batch_size=3, logprob_chunk_tokens=10,
                       megatron=megatron)


def _packed(policy: PolicyConfig) -> PolicyConfig:
    """Sequence packing into rows of 2 x 24 tokens (train) and 3 x 24 (logprobs): several rows, several samples
    in most of them, for the 8 samples of 5-24 tokens in make_batch."""
    return policy.model_copy(update={"sequence_packing": True, "max_total_sequence_length": 24})


def _packed_checks(policy: PolicyConfig, batch: Batch, denominator: float) -> dict[str, Any]:
    from cipo_nemo.models.policy.megatron_worker import MegatronPolicyWorker

    worker = MegatronPolicyWorker(policy=_packed(policy), num_steps=4, seed=0)
    result = {"is_output_rank": worker.is_output_rank, "initial_logprobs": worker.get_logprobs(batch)}
    result["step"] = worker.train(batch, LOSS, global_denominator=denominator)
    result["stepped_logprobs"] = worker.get_logprobs(batch)
    return result


def _denominator(shard_micro_batches: list[Batch]) -> float:
    """The global loss denominator: this rank's count summed over the world (= over DP when TP = PP = 1)."""
    count = torch.tensor(float(LOSS.local_denominator(shard_micro_batches)), dtype=torch.float64)
    dist.all_reduce(count)
    return count.item()


def _skip_checks(policy: PolicyConfig, batch: Batch) -> dict[str, Any]:
    """Two epochs of mini-batches from the same start, without and with the zero-advantage skip (fresh workers)."""
    from cipo_nemo.models.policy.megatron_worker import MegatronPolicyWorker

    batch = with_zero_advantages(batch.select(list(range(len(batch)))))
    results = {}
    for name, plan in zip(("full", "skip"), skip_plans(batch, LOSS)):
        worker = MegatronPolicyWorker(policy=policy, num_steps=4, seed=0)
        metrics = take_optimizer_steps(worker, batch, plan, LOSS)
        results[name] = {"metrics": metrics, "export": worker.export_hf_weights()}
    return results


ONE_LIVE_SAMPLE = 2  # the one sample of make_batch's batch that keeps its advantage in the one-live-sample step


def _one_live_sample_batch(batch: Batch) -> tuple[Batch, float]:
    """A step where only one sample carries gradient, with the whole batch's normalizer."""
    return batch.select([ONE_LIVE_SAMPLE]), float(LOSS.local_denominator([batch]))


# ----- rank functions (run in spawned processes) ------------------------------------------------------------


def single_rank_checks(rank: int, world_size: int, policies: dict[str, PolicyConfig],
                       batches: dict[str, Batch], export_path: str) -> dict[str, Any]:
    from cipo_nemo.models.policy.megatron_worker import MegatronPolicyWorker

    results: dict[str, Any] = {}
    for name, policy in policies.items():
        batch = batches[name]
        worker = MegatronPolicyWorker(policy=policy, num_steps=4, seed=0)
        result = {"initial_logprobs": worker.get_logprobs(batch), "initial_export": worker.export_hf_weights(),
                  "adam_fused": _adam_fused(worker)}
        with _recording_input_widths(worker) as widths:
            result["step"] = worker.train(batch, LOSS, global_denominator=_denominator([batch]))
        result["train_widths"] = widths
        result["stepped_logprobs"] = worker.get_logprobs(batch)
        result["reference_logprobs"] = worker.get_reference_logprobs(batch)
        result["logprobs_after_reference"] = worker.get_logprobs(batch)
        result["stepped_export"] = worker.export_hf_weights()
        results[name] = result
    # the same llama step in one micro-batch of 8 (the runs above use 4 micro-batches of 2), and with megatron's
    # plain (not distributed) optimizer
    llama = policies["llama"]
    # (unchunked, so each position reaches the output layer once: counted)
    one_micro_batch = llama.model_copy(
        update={"micro_batch_size": 8, "logprob_chunk_tokens": 0,
                "megatron": llama.megatron.model_copy(update={"distributed_optimizer": False})}
    )
    worker = MegatronPolicyWorker(policy=one_micro_batch, num_steps=4, seed=0)
    with _counting_output_layer_tokens(worker) as projected:
        step = worker.train(batches["llama"], LOSS, global_denominator=_denominator([batches["llama"]]))
    results["llama_one_micro_batch"] = {
        "step": step,
        "train_projected_tokens": sum(projected),
        "stepped_export": worker.export_hf_weights(),
        "exported_count": worker.export_hf_weights_to(export_path),
        "offload": _offload_checks(worker),
    }
    # two epochs of two shuffled mini-batches: four optimizer steps from one batch, pi_old fixed (issue: clipping
    # that binds); the HF policy takes the same steps in test_mini_batch_steps_match_hf
    worker = MegatronPolicyWorker(policy=llama, num_steps=4, seed=0)
    results["llama_mini_batches"] = [
        worker.train(mini_batch, LOSS, global_denominator=_denominator([mini_batch]))
        for mini_batch in (batches["llama"].select(indices) for indices in _mini_batch_plan(len(batches["llama"])))
    ]
    results["llama_distributed_offload"] = _offload_checks(worker)
    results["import_shims"] = {
        "transformer_engine_left_in_sys_modules": "transformer_engine" in sys.modules,
        "typing_override": hasattr(typing, "override"),
    }
    results["llama_packed"] = _packed_checks(llama, batches["llama"], _denominator([batches["llama"]]))
    worker = MegatronPolicyWorker(policy=llama, num_steps=4, seed=0)
    one_live, denominator = _one_live_sample_batch(batches["llama"])
    worker.train(one_live, LOSS, global_denominator=denominator)
    results["llama_one_live"] = {"export": worker.export_hf_weights()}
    results["errors"] = {
        "tp2_in_world_of_1": _error_of(MegatronPolicyWorker, llama.model_copy(
            update={"megatron": llama.megatron.model_copy(update={"tensor_parallel": 2})})),
    }
    return results


@contextlib.contextmanager
def _counting_output_layer_tokens(worker: Any) -> Iterator[list[int]]:
    """Token positions per call of the worker's output layer while the block runs."""
    from megatron.core.utils import unwrap_model

    counts: list[int] = []
    output_layer = unwrap_model(worker._chunks[-1]).output_layer
    handle = output_layer.register_forward_hook(lambda _, inputs, __: counts.append(inputs[0].shape[:-1].numel()))
    try:
        yield counts
    finally:
        handle.remove()


@contextlib.contextmanager
def _recording_input_widths(worker: Any) -> Iterator[list[int]]:
    """The sequence length of every micro-batch the worker's model runs while the block runs."""
    from megatron.core.utils import unwrap_model

    widths: list[int] = []
    model = unwrap_model(worker._chunks[0])
    handle = model.register_forward_pre_hook(lambda _, __, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                             with_kwargs=True)
    try:
        yield widths
    finally:
        handle.remove()


def _offload_checks(worker: Any) -> dict[str, int]:
    """What the optimizer offload would move in megatron's real optimizer (fp32 here), and what it moves on CPU."""
    from cipo_nemo.models.policy.optimizer_offload import optimizer_owned_tensors, torch_optimizers

    owned = list(optimizer_owned_tensors(torch_optimizers(worker._optimizer),
                                         [parameter for _, parameter in worker._named_parameters()]))
    return {"main_copies": sum(slot.key is None for slot in owned),
            "state": sum(slot.key is not None for slot in owned),
            "offloaded": worker.offload_optimizer(), "restored": worker.restore_optimizer()}


def _adam_fused(worker: Any) -> list[bool]:
    """Per torch Adam inside the worker's megatron optimizer: does it step with the fused CPU kernel?"""
    from cipo_nemo.models.policy.megatron_worker import _torch_adams

    return [all(group["fused"] for group in inner.param_groups) for _, inner in _torch_adams(worker._optimizer)]


def _mini_batch_plan(num_samples: int) -> list[list[int]]:
    return plan_mini_batches(num_samples, size=4, epochs=2, generator=torch.Generator().manual_seed(0))


def _error_of(worker_class: type, policy: PolicyConfig) -> str:
    try:
        worker_class(policy=policy, num_steps=1, seed=0)
    except (ValueError, NotImplementedError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def tp2_checks(rank: int, world_size: int, policies: dict[str, PolicyConfig], batches: dict[str, Batch],
               checkpoint_dir: str, hf_dir: str) -> dict[str, Any]:
    from cipo_nemo.models.policy.megatron_worker import MegatronPolicyWorker

    results: dict[str, Any] = {}
    for name, policy in policies.items():
        batch = batches[name]
        worker = MegatronPolicyWorker(policy=policy, num_steps=4, seed=0)
        result = {"is_output_rank": worker.is_output_rank, "initial_logprobs": worker.get_logprobs(batch)}
        # rows whose longest sequence has an odd length: padded to a multiple of TP (sequence parallelism needs it)
        result["odd_length_logprobs"] = worker.get_logprobs(batch.select(ODD_LENGTH_ROWS))
        # TP ranks of one DP group share the shard: the denominator is counted once per DP group
        denominator = float(LOSS.local_denominator([batch]))
        result["step"] = worker.train(batch, LOSS, global_denominator=denominator)
        result["stepped_logprobs"] = worker.get_logprobs(batch)
        result["stepped_export"] = worker.export_hf_weights()
        if name == "llama":
            result["refit_files"] = _refit_file_checks(worker, rank, Path(checkpoint_dir).parent / "refit")
            worker.save_checkpoint(checkpoint_dir)
            worker.save_hf(hf_dir)
            result["second_step"] = worker.train(batch, LOSS, global_denominator=denominator)
            result["second_step_export"] = worker.export_hf_weights()
        results[name] = result
    denominator = float(LOSS.local_denominator([batches["llama"]]))
    results["llama_packed"] = _packed_checks(policies["llama"], batches["llama"], denominator)
    results["llama_skip"] = _skip_checks(policies["llama"], batches["llama"])
    return results


def _refit_file_checks(worker: Any, rank: int, directory: Path) -> dict[str, Any]:
    """export_hf_weights_to writes once per node: here one node (LOCAL_RANK 0, 1), then two simulated nodes (both
    ranks LOCAL_RANK 0, one shared filesystem), each followed by remove_exported_weights."""
    checks: dict[str, Any] = {}
    for layout, local_rank in (("one_node", rank), ("two_nodes", 0)):
        os.environ["LOCAL_RANK"] = str(local_rank)
        path = directory / layout / "weights.pt"  # the directory does not exist yet: the writers make it
        count = worker.export_hf_weights_to(path)
        checks[layout] = {"count": count, "file_tensors": len(load_refit_file(path))}
        dist.barrier()
        worker.remove_exported_weights(path)
        dist.barrier()
        # this layout's own directory only: the other rank may already be writing the next layout's file
        mine = directory / layout
        checks[layout]["left_behind"] = sorted(str(p) for p in directory.rglob("*") if p.is_relative_to(mine))
    os.environ["LOCAL_RANK"] = str(rank)
    return checks


def pp2_checks(rank: int, world_size: int, policies: dict[str, PolicyConfig], batches: dict[str, Batch],
               checkpoint_dir: str) -> dict[str, Any]:
    from cipo_nemo.models.policy.megatron_worker import MegatronPolicyWorker

    results: dict[str, Any] = {}
    for name, policy in policies.items():
        batch = batches[name]
        worker = MegatronPolicyWorker(policy=policy, num_steps=4, seed=0)
        result = {"is_output_rank": worker.is_output_rank, "initial_logprobs": worker.get_logprobs(batch)}
        denominator = float(LOSS.local_denominator([batch]))
        if name == "llama":
            # the TP=2 checkpoint (weights, Adam state, schedule position after step 1), resharded to PP=2
            worker.load_checkpoint(checkpoint_dir)
            result["adam_fused_after_load"] = _adam_fused(worker)
            result["loaded_logprobs"] = worker.get_logprobs(batch)
            result["second_step"] = worker.train(batch, LOSS, global_denominator=denominator)
            result["second_step_export"] = worker.export_hf_weights()
        else:
            result["step"] = worker.train(batch, LOSS, global_denominator=denominator)
            result["stepped_logprobs"] = worker.get_logprobs(batch)
        results[name] = result
    denominator = float(LOSS.local_denominator([batches["qwen2_tied"]]))
    results["qwen2_tied_packed"] = _packed_checks(policies["qwen2_tied"], batches["qwen2_tied"], denominator)
    results["qwen2_tied_skip"] = _skip_checks(policies["qwen2_tied"], batches["qwen2_tied"])
    return results


def dp2_checks(rank: int, world_size: int, policy: PolicyConfig, batch: Batch) -> dict[str, Any]:
    from cipo_nemo.models.policy.megatron_worker import MegatronPolicyWorker

    worker = MegatronPolicyWorker(policy=policy, num_steps=4, seed=0)
    shard = batch.shard_by_tokens(worker.dp_size)[worker.dp_rank]
    step = worker.train(shard, LOSS, global_denominator=_denominator(shard.micro_batches(policy.micro_batch_size)))
    result = {
        "dp": (worker.dp_rank, worker.dp_size),
        "shard_size": len(shard),
        "step": step,
        "stepped_export": worker.export_hf_weights(),
        "reference_logprobs": worker.get_reference_logprobs(shard),
    }
    # one sample carries gradient, two ranks: the facade's padding gives the other rank an inert copy
    worker = MegatronPolicyWorker(policy=policy, num_steps=4, seed=0)
    one_live, denominator = _one_live_sample_batch(batch)
    padded_shard = with_inert_padding(one_live, worker.dp_size).shard_by_tokens(worker.dp_size)[worker.dp_rank]
    worker.train(padded_shard, LOSS, global_denominator=denominator)
    result["one_live_export"] = worker.export_hf_weights()
    return result


# ----- the runs ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single(references: dict[str, HFReference], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    export_path = tmp_path_factory.mktemp("export") / "weights.pt"
    policies = {name: _policy(reference) for name, reference in references.items()}
    batches = {name: reference.batch for name, reference in references.items()}
    (results,) = run_on_ranks(single_rank_checks, world_size=1, args=(policies, batches, str(export_path)))
    results["export_path"] = export_path
    return results


@pytest.fixture(scope="module")
def tp2(references: dict[str, HFReference], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("tp2")
    policies = {name: _policy(reference, tensor_parallel=2) for name, reference in references.items()}
    batches = {name: reference.batch for name, reference in references.items()}
    per_rank = run_on_ranks(
        tp2_checks, world_size=2, args=(policies, batches, str(root / "checkpoint"), str(root / "hf"))
    )
    return {"per_rank": per_rank, "checkpoint_dir": root / "checkpoint", "hf_dir": root / "hf"}


@pytest.fixture(scope="module")
def pp2(references: dict[str, HFReference], tp2: dict[str, Any]) -> dict[str, Any]:
    policies = {name: _policy(reference, pipeline_parallel=2) for name, reference in references.items()}
    batches = {name: reference.batch for name, reference in references.items()}
    return {"per_rank": run_on_ranks(pp2_checks, world_size=2, args=(policies, batches, str(tp2["checkpoint_dir"])))}


@pytest.fixture(scope="module")
def dp2(references: dict[str, HFReference]) -> list[dict[str, Any]]:
    reference = references["llama"]
    policy = _policy(reference, activation_recompute=True, distributed_optimizer=True)
    return run_on_ranks(dp2_checks, world_size=2, args=(policy, reference.batch))


def _output(run: dict[str, Any], model: str) -> dict[str, Any]:
    """The one output rank's results (TP rank 0 on the last stage); the other rank returned None logprobs."""
    outputs = [ranks[model] for ranks in run["per_rank"] if ranks[model]["is_output_rank"]]
    others = [ranks[model] for ranks in run["per_rank"] if not ranks[model]["is_output_rank"]]
    assert len(outputs) == 1 and all(other["initial_logprobs"] is None for other in others)
    return outputs[0]


# ----- logprobs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
def test_logprobs_equal_hf(layout: str, model: str, request: pytest.FixtureRequest,
                           references: dict[str, HFReference]) -> None:
    match layout:
        case "tp1":
            logprobs = request.getfixturevalue("single")[model]["initial_logprobs"]
        case _:
            logprobs = _output(request.getfixturevalue(layout), model)["initial_logprobs"]
    expected = references[model].initial_logprobs
    assert logprobs.shape == expected.shape
    assert max_abs_diff(logprobs, expected) < LOGPROB_TOLERANCE
    # padding and t = 0 are exactly 0, as in the HF policy
    assert torch.equal(logprobs == 0, expected == 0)
    if layout == "tp2":
        odd_rows = references[model].batch.select(ODD_LENGTH_ROWS)
        assert max(sequence_lengths(odd_rows)) % 2 == 1
        odd = _output(request.getfixturevalue(layout), model)["odd_length_logprobs"]
        assert max_abs_diff(odd, expected[ODD_LENGTH_ROWS]) < LOGPROB_TOLERANCE


# ----- train step -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_train_step_matches_hf(model: str, single: dict[str, Any], tp2: dict[str, Any], pp2: dict[str, Any],
                               references: dict[str, HFReference]) -> None:
    reference = references[model]
    runs = {"tp1": single[model], "tp2": _output(tp2, model)}
    if model == "qwen2_tied":  # the tied embedding is split over the first and last PP stage
        runs["pp2"] = _output(pp2, model)
    for layout, result in runs.items():
        step = result["step"]
        assert step["num_valid_tokens"] == reference.step["num_valid_tokens"], layout
        assert step["loss"] == pytest.approx(reference.step["loss"], rel=1e-5, abs=1e-7), layout
        assert step["grad_norm"] == pytest.approx(reference.step["grad_norm"], rel=1e-5), layout
        assert step["lr"] == reference.step["lr"], layout
        assert max_abs_diff(result["stepped_logprobs"], reference.stepped_logprobs) < LOGPROB_TOLERANCE, layout
    # the step moved the policy far beyond the tolerance
    assert max_abs_diff(reference.stepped_logprobs, reference.initial_logprobs) > 0.05


def test_a_train_step_projects_only_the_outputs_that_predict_response_tokens(
    single: dict[str, Any], references: dict[str, HFReference]
) -> None:
    """The loss reads response tokens only: the prompt's positions never reach the output layer in training
    (and the step still equals HF's whole-vocab, every-position one: test_train_step_matches_hf)."""
    run = single["llama_one_micro_batch"]
    assert run["train_projected_tokens"] == int(references["llama"].batch["response_mask"].sum())
    assert run["step"]["loss"] == pytest.approx(references["llama"].step["loss"], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("model", MODELS)
def test_training_micro_batches_group_similar_lengths_and_pad_to_their_own_longest(
    model: str, single: dict[str, Any], references: dict[str, HFReference]
) -> None:
    """The step sorts its shard by length, so each micro-batch of 2 runs at its own longest length (and the
    step still equals HF's: test_train_step_matches_hf)."""
    lengths = sorted(sequence_lengths(references[model].batch))
    widths = single[model]["train_widths"]
    assert widths == [max(lengths[i : i + 2]) for i in range(0, len(lengths), 2)]
    assert sum(widths) < len(widths) * max(lengths)


def test_mini_batch_steps_match_hf(single: dict[str, Any], references: dict[str, HFReference]) -> None:
    reference = references["llama"]
    policy = HFPolicy(policy=_policy(reference), num_steps=4, seed=0)
    expected = [policy.train(reference.batch.select(indices), LOSS)
                for indices in _mini_batch_plan(len(reference.batch))]
    steps = single["llama_mini_batches"]
    assert len(steps) == len(expected) == 4
    for number, (step, hf_step) in enumerate(zip(steps, expected)):
        assert step["num_valid_tokens"] == hf_step["num_valid_tokens"], number
        assert step["loss"] == pytest.approx(hf_step["loss"], rel=1e-4, abs=1e-6), number
        assert step["grad_norm"] == pytest.approx(hf_step["grad_norm"], rel=1e-4), number
        for name in ("clip_fraction_low", "clip_fraction_high", "ratio_mean"):
            assert step[name] == pytest.approx(hf_step[name], abs=1e-4), (number, name)
    # the later steps see a policy that moved away from pi_old: the clip binds on the Megatron backend too
    assert sum(step["clip_fraction_low"] + step["clip_fraction_high"] for step in steps[2:]) > 0
    assert steps[3]["ratio_max"] > steps[0]["ratio_max"]


def test_the_optimizer_offload_takes_the_state_and_never_the_models_weights(single: dict[str, Any]) -> None:
    """fp32: megatron's FP32Optimizer steps the model's parameters themselves and the distributed optimizer views
    of the DDP buffer: neither may leave the device with the optimizer's state. On CPU nothing moves."""
    for run in (single["llama_one_micro_batch"]["offload"], single["llama_distributed_offload"]):
        assert run["main_copies"] == 0 and run["state"] > 0
        assert (run["offloaded"], run["restored"]) == (0, 0)


def test_one_and_four_micro_batches_take_the_same_step(single: dict[str, Any]) -> None:
    # four micro-batches + distributed optimizer vs one micro-batch + megatron's plain optimizer
    four, one = single["llama"], single["llama_one_micro_batch"]
    assert one["step"]["loss"] == pytest.approx(four["step"]["loss"], rel=1e-6)
    assert one["step"]["grad_norm"] == pytest.approx(four["step"]["grad_norm"], rel=1e-6)
    assert one["step"]["num_valid_tokens"] == four["step"]["num_valid_tokens"]
    assert max_weight_diff(one["stepped_export"], four["stepped_export"]) < STEP_WEIGHT_TOLERANCE


@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
def test_packed_sequences_give_the_unpacked_numbers(layout: str, request: pytest.FixtureRequest,
                                                    references: dict[str, HFReference]) -> None:
    model = "qwen2_tied" if layout == "pp2" else "llama"
    reference = references[model]
    rows = plan_packed_rows(sequence_lengths(reference.batch), capacity=2 * 24)
    assert 1 < len(rows) < len(reference.batch) and max(len(row.indices) for row in rows) > 1  # a real packing
    match layout:
        case "tp1":
            result = request.getfixturevalue("single")[f"{model}_packed"]
        case _:
            run = request.getfixturevalue(layout)
            result = _output(run, f"{model}_packed")
    assert max_abs_diff(result["initial_logprobs"], reference.initial_logprobs) < LOGPROB_TOLERANCE
    assert torch.equal(result["initial_logprobs"] == 0, reference.initial_logprobs == 0)
    assert result["step"]["num_valid_tokens"] == reference.step["num_valid_tokens"]
    assert result["step"]["loss"] == pytest.approx(reference.step["loss"], rel=1e-5, abs=1e-7)
    assert result["step"]["grad_norm"] == pytest.approx(reference.step["grad_norm"], rel=1e-5)
    assert max_abs_diff(result["stepped_logprobs"], reference.stepped_logprobs) < LOGPROB_TOLERANCE


def test_data_parallel_step_equals_single_rank_step(dp2: list[dict[str, Any]], single: dict[str, Any],
                                                   tp2: dict[str, Any]) -> None:
    assert [result["dp"] for result in dp2] == [(0, 2), (1, 2)]
    assert sum(result["shard_size"] for result in dp2) == 8
    expected = single["llama"]
    for result in dp2:  # every DP rank reports the global step's metrics
        assert result["step"]["loss"] == pytest.approx(expected["step"]["loss"], rel=1e-6)
        assert result["step"]["grad_norm"] == pytest.approx(expected["step"]["grad_norm"], rel=1e-6)
        assert result["step"]["num_valid_tokens"] == expected["step"]["num_valid_tokens"]
    assert dp2[1]["stepped_export"] is None  # full weights on global rank 0 only
    assert max_weight_diff(dp2[0]["stepped_export"], expected["stepped_export"]) < STEP_WEIGHT_TOLERANCE
    tp2_export = tp2["per_rank"][0]["llama"]["stepped_export"]  # gathered over TP onto global rank 0
    assert tp2["per_rank"][1]["llama"]["stepped_export"] is None
    assert max_weight_diff(tp2_export, expected["stepped_export"]) < STEP_WEIGHT_TOLERANCE


# ----- reference policy, export, checkpoints ---------------------------------------------------------------


def test_reference_logprobs_stay_at_the_initial_weights(single: dict[str, Any], dp2: list[dict[str, Any]],
                                                        references: dict[str, HFReference]) -> None:
    result = single["llama"]
    assert max_abs_diff(result["reference_logprobs"], result["initial_logprobs"]) == 0.0
    assert max_abs_diff(result["logprobs_after_reference"], result["stepped_logprobs"]) == 0.0
    batch = references["llama"].batch
    shards = batch.shard_by_tokens(2)
    for shard, dp_result in zip(shards, dp2):
        expected = references["llama"].initial_logprobs[_rows_of(shard, batch)]
        assert max_abs_diff(dp_result["reference_logprobs"], expected) < LOGPROB_TOLERANCE


def _rows_of(shard: Batch, batch: Batch) -> list[int]:
    rows = {tuple(row.tolist()): index for index, row in enumerate(batch["input_ids"])}
    return [rows[tuple(row.tolist())] for row in shard["input_ids"]]


@pytest.mark.parametrize("model", MODELS)
def test_export_round_trips_into_hf(model: str, single: dict[str, Any], references: dict[str, HFReference]) -> None:
    reference, result = references[model], single[model]
    # the initial export is the HF checkpoint, bit for bit (a tied model emits no lm_head.weight)
    assert max_weight_diff(result["initial_export"], reference.initial_weights) == 0.0
    hf_model = AutoModelForCausalLM.from_pretrained(reference.model_dir, dtype=torch.float32)
    hf_model.load_state_dict(result["stepped_export"], strict=False)
    stepped = HFPolicy(policy=make_policy(reference.model_dir), num_steps=1, seed=0)
    stepped.model.load_state_dict(hf_model.state_dict())
    assert max_abs_diff(stepped.get_logprobs(reference.batch), result["stepped_logprobs"]) < LOGPROB_TOLERANCE


def test_refit_file_is_written_once_per_node_and_removed(tp2: dict[str, Any],
                                                        references: dict[str, HFReference]) -> None:
    expected = len(references["llama"].initial_weights)
    rank0, rank1 = (ranks["llama"]["refit_files"] for ranks in tp2["per_rank"])
    assert rank0["one_node"]["count"] == expected and rank1["one_node"]["count"] == 0  # LOCAL_RANK 0 writes
    assert rank0["two_nodes"]["count"] == rank1["two_nodes"]["count"] == expected  # each node's first rank
    for checks in (rank0, rank1):
        assert checks["one_node"]["file_tensors"] == checks["two_nodes"]["file_tensors"] == expected
        assert checks["one_node"]["left_behind"] == []
    assert rank0["two_nodes"]["left_behind"] == rank1["two_nodes"]["left_behind"] == []


def test_export_to_file_and_save_hf(single: dict[str, Any], tp2: dict[str, Any],
                                    references: dict[str, HFReference]) -> None:
    saved = load_refit_file(single["export_path"])
    assert single["llama_one_micro_batch"]["exported_count"] == len(saved) == len(references["llama"].initial_weights)
    assert max_weight_diff(saved, single["llama_one_micro_batch"]["stepped_export"]) == 0.0
    # save_hf after the TP=2 step: a loadable HF directory with the stepped weights and the tokenizer
    from_disk = HFPolicy(policy=make_policy(tp2["hf_dir"]), num_steps=1, seed=0)
    expected = _output(tp2, "llama")["stepped_logprobs"]
    assert max_abs_diff(from_disk.get_logprobs(references["llama"].batch), expected) < LOGPROB_TOLERANCE
    assert len(AutoTokenizer.from_pretrained(tp2["hf_dir"])) == len(
        AutoTokenizer.from_pretrained(references["llama"].model_dir)
    )


def test_checkpoint_saved_at_tp2_loads_at_pp2(single: dict[str, Any], tp2: dict[str, Any], pp2: dict[str, Any]) -> None:
    saved, loaded = _output(tp2, "llama"), _output(pp2, "llama")
    assert max_abs_diff(loaded["loaded_logprobs"], saved["stepped_logprobs"]) < 1e-5
    # Adam moments and the LR schedule position came back too: step 2 continues the run
    assert loaded["second_step"]["lr"] == saved["second_step"]["lr"] == pytest.approx(7.5e-4)
    assert loaded["second_step"]["loss"] == pytest.approx(saved["second_step"]["loss"], rel=1e-5, abs=1e-7)
    assert loaded["second_step"]["grad_norm"] == pytest.approx(saved["second_step"]["grad_norm"], rel=1e-5)
    # fused CPU Adam when built (test_fused_cpu_adam.py) and again after the load replaced its param groups
    assert single["llama"]["adam_fused"] == [True] and loaded["adam_fused_after_load"] == [True]
    # the weights after step 2 agree (Adam's step count and moments were restored, not restarted)
    tp2_export = tp2["per_rank"][0]["llama"]["second_step_export"]
    pp2_export = pp2["per_rank"][0]["llama"]["second_step_export"]  # global rank 0 (first stage) holds the export
    assert max_weight_diff(pp2_export, tp2_export) < STEP_WEIGHT_TOLERANCE


# ----- setup -----------------------------------------------------------------------------------------------


def test_import_shims_and_configuration_errors(single: dict[str, Any]) -> None:
    # the Transformer Engine stand-in existed only while megatron-bridge's lora_layers imported
    assert single["import_shims"] == {"transformer_engine_left_in_sys_modules": False, "typing_override": True}
    assert single["errors"]["tp2_in_world_of_1"].startswith("ValueError: world size 1 is not divisible")
    assert "policy.megatron.tensor_parallel" in single["errors"]["tp2_in_world_of_1"]


def test_cpu_compat_is_a_no_op_with_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    from cipo_nemo.models.policy import cpu_compat

    # as in a fresh process (another test may have applied the patches in this one already)
    monkeypatch.setattr(cpu_compat, "_cpu_compat_mode", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    current_device, stream = torch.cuda.current_device, torch.cuda.Stream
    cpu_compat.apply_cpu_compat()
    assert cpu_compat._cpu_compat_mode is None
    assert torch.cuda.current_device is current_device and torch.cuda.Stream is stream


@pytest.mark.parametrize(("layout", "model"), [("tp2", "llama"), ("pp2", "qwen2_tied")])
def test_the_zero_advantage_skip_takes_the_same_steps(layout: str, model: str,
                                                      request: pytest.FixtureRequest) -> None:
    """TP=2 and PP=2, two epochs of mini-batches: leaving the A = 0 samples out (each mini-batch keeping its
    normalizer) gives the weights and per-step gradient norms of training on them."""
    run = request.getfixturevalue(layout)
    checks = run["per_rank"][0][f"{model}_skip"]
    full, skipped = checks["full"], checks["skip"]
    assert skipped["metrics"]["optimizer_steps"] == full["metrics"]["optimizer_steps"] == 4
    assert skipped["metrics"]["grad_norm"] == pytest.approx(full["metrics"]["grad_norm"], rel=1e-5)
    assert skipped["metrics"]["num_valid_tokens"] < full["metrics"]["num_valid_tokens"]  # fewer tokens computed
    assert max_weight_diff(full["export"], skipped["export"]) < STEP_WEIGHT_TOLERANCE / 10


def test_a_rank_without_a_sample_that_carries_gradient_gets_an_inert_one(dp2: list[dict[str, Any]],
                                                                         single: dict[str, Any]) -> None:
    """One live sample, two data-parallel ranks: the step equals the single rank's step on that sample."""
    expected = single["llama_one_live"]["export"]
    assert max_weight_diff(dp2[0]["one_live_export"], expected) < STEP_WEIGHT_TOLERANCE / 10
    assert max_weight_diff(expected, single["llama"]["initial_export"]) > STEP_WEIGHT_TOLERANCE  # it moved
