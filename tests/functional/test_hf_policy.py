"""HFPolicy on tiny random models (fp32, CPU): micro-batch invariance, sequence packing, checkpoints, reference
policy, export."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
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

from cipo_nemo.data.batch import Batch
from cipo_nemo.models.policy.hf_policy import HFPolicy
from cipo_nemo.models.policy.megatron_setup import build_lr_scheduler
from cipo_nemo.models.policy.microbatches import (
    combine_optimizer_steps,
    plan_mini_batches,
    plan_optimizer_steps,
    take_optimizer_steps,
)
from cipo_nemo.models.tiny import build_tiny_model_dir


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("hf_policy") / "llama", architecture="llama")


@pytest.fixture(scope="module")
def tied_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(
        tmp_path_factory.mktemp("hf_policy") / "qwen2", architecture="qwen2", tie_word_embeddings=True
    )


def _vocab_size(model_dir: Path) -> int:
    return len(AutoTokenizer.from_pretrained(model_dir))


def _weights(policy: HFPolicy) -> dict[str, torch.Tensor]:
    return dict(policy.export_hf_weights())


def test_one_and_four_micro_batches_take_the_same_step(llama_dir: Path) -> None:
    batch = make_batch(vocab_size=_vocab_size(llama_dir))
    one = HFPolicy(policy=make_policy(llama_dir, micro_batch_size=8), num_steps=4, seed=0)
    four = HFPolicy(policy=make_policy(llama_dir, micro_batch_size=2), num_steps=4, seed=0)
    metrics_one, metrics_four = one.train(batch, LOSS), four.train(batch, LOSS)

    assert metrics_one["num_valid_tokens"] == metrics_four["num_valid_tokens"] == batch.num_valid_tokens()
    assert metrics_four["loss"] == pytest.approx(metrics_one["loss"], rel=1e-6)
    assert metrics_four["grad_norm"] == pytest.approx(metrics_one["grad_norm"], rel=1e-6)
    assert metrics_one["grad_norm"] > 0.01
    for name in ("clip_fraction_low", "clip_fraction_high", "ratio_mean", "tis_weight_mean"):
        assert metrics_four[name] == pytest.approx(metrics_one[name], rel=1e-6)
    assert max_weight_diff(_weights(one), _weights(four)) < STEP_WEIGHT_TOLERANCE


@pytest.mark.parametrize("model", ["llama", "tied_qwen2"])
def test_chunked_logprobs_take_the_unchunked_step(model: str, request: pytest.FixtureRequest) -> None:
    """lm_head + log-softmax over 5 tokens at a time (checkpointed per chunk in train) give the logprobs and the
    step of the whole micro-batch at once, with a tied head too."""
    model_dir = request.getfixturevalue(f"{model}_dir")
    batch = make_batch(vocab_size=_vocab_size(model_dir))
    whole = HFPolicy(policy=make_policy(model_dir, micro_batch_size=3, logprob_chunk_tokens=0), num_steps=4, seed=0)
    chunked = HFPolicy(policy=make_policy(model_dir, micro_batch_size=3, logprob_chunk_tokens=5), num_steps=4, seed=0)

    assert max_abs_diff(chunked.get_logprobs(batch), whole.get_logprobs(batch)) < 1e-6
    metrics_whole, metrics_chunked = whole.train(batch, LOSS), chunked.train(batch, LOSS)
    assert metrics_whole["grad_norm"] > 0.01
    assert metrics_chunked["loss"] == pytest.approx(metrics_whole["loss"], rel=1e-6)
    assert metrics_chunked["grad_norm"] == pytest.approx(metrics_whole["grad_norm"], rel=1e-5)
    assert max_weight_diff(_weights(whole), _weights(chunked)) < STEP_WEIGHT_TOLERANCE
    assert max_abs_diff(chunked.get_logprobs(batch), whole.get_logprobs(batch)) < 1e-5


@pytest.mark.parametrize("packing", [False, True])
def test_a_train_step_projects_only_the_outputs_that_predict_response_tokens(llama_dir: Path, packing: bool) -> None:
    """The loss reads response tokens only, so in training the prompt's positions never reach lm_head; the
    logprob pass still scores every position."""
    batch = make_batch(vocab_size=_vocab_size(llama_dir))
    policy = HFPolicy(policy=make_policy(llama_dir, micro_batch_size=3, logprob_chunk_tokens=0,
                                         max_total_sequence_length=24, sequence_packing=packing),
                      num_steps=4, seed=0)
    projected: list[int] = []
    lm_head = policy._model.get_output_embeddings()
    handle = lm_head.register_forward_hook(lambda _, inputs, __: projected.append(inputs[0].shape[:-1].numel()))
    try:
        logprobs = policy.get_logprobs(batch)
        logprob_pass = sum(projected)
        projected.clear()
        policy.train(batch, LOSS)
    finally:
        handle.remove()
    assert sum(projected) == int(batch["response_mask"].sum())
    assert logprob_pass > sum(projected) and int((logprobs != 0).sum()) > int(batch["response_mask"].sum())


def test_training_micro_batches_group_similar_lengths_and_pad_to_their_own_longest(llama_dir: Path) -> None:
    """The step sorts its samples by length, so each micro-batch of 2 runs at its own longest length."""
    from cipo_nemo.data.packing import sequence_lengths

    batch = make_batch(vocab_size=_vocab_size(llama_dir))
    policy = HFPolicy(policy=make_policy(llama_dir, micro_batch_size=2), num_steps=4, seed=0)
    widths: list[int] = []
    handle = policy._model.base_model.register_forward_pre_hook(
        lambda _, __, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        policy.train(batch, LOSS)
    finally:
        handle.remove()
    lengths = sorted(sequence_lengths(batch))
    assert widths == [max(lengths[i : i + 2]) for i in range(0, len(lengths), 2)]
    assert sum(widths) < len(widths) * max(lengths)  # less padding than the batch's longest everywhere


@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_packed_sequences_give_the_unpacked_numbers(model: str, request: pytest.FixtureRequest) -> None:
    from cipo_nemo.data.packing import plan_packed_rows, sequence_lengths

    model_dir = request.getfixturevalue("llama_dir" if model == "llama" else "tied_qwen2_dir")
    batch = make_batch(vocab_size=_vocab_size(model_dir))
    # rows of 2 x 24 tokens for 8 samples of 5-24 tokens: several rows, several samples in most of them
    assert len(plan_packed_rows(sequence_lengths(batch), capacity=2 * 24)) in range(2, 8)
    results = {}
    for packing in (False, True):
        policy = HFPolicy(policy=make_policy(model_dir, micro_batch_size=2, logprob_micro_batch_size=3,
                                             max_total_sequence_length=24, sequence_packing=packing),
                          num_steps=4, seed=0)
        results[packing] = (policy.get_logprobs(batch), policy.train(batch, LOSS), policy.get_logprobs(batch))
    (plain, plain_step, plain_after), (packed, packed_step, packed_after) = results[False], results[True]
    assert max_abs_diff(packed, plain) < 1e-5
    assert torch.equal(packed == 0, plain == 0)
    assert packed_step["loss"] == pytest.approx(plain_step["loss"], rel=1e-5)
    assert packed_step["grad_norm"] == pytest.approx(plain_step["grad_norm"], rel=1e-5)
    assert max_abs_diff(packed_after, plain_after) < 1e-5
    assert max_abs_diff(plain_after, plain) > 0.05  # the step moved the policy far beyond the tolerance


def test_checkpoint_round_trip_continues_the_same_run(llama_dir: Path, tmp_path: Path) -> None:
    batch = make_batch(vocab_size=_vocab_size(llama_dir))
    policy_cfg = make_policy(llama_dir, micro_batch_size=4)
    straight = HFPolicy(policy=policy_cfg, num_steps=4, seed=0)
    straight.train(batch, LOSS)
    straight.save_checkpoint(tmp_path / "step1")
    second_step = straight.train(batch, LOSS)

    resumed = HFPolicy(policy=policy_cfg, num_steps=4, seed=1)
    resumed.load_checkpoint(tmp_path / "step1")
    resumed_step = resumed.train(batch, LOSS)

    # Adam moments and the LR schedule position came back too: the second step is bit-identical
    assert resumed_step == second_step
    assert second_step["lr"] == pytest.approx(1e-3 * (1 - 1 / 4))
    assert max_weight_diff(_weights(straight), _weights(resumed)) == 0.0


def test_a_checkpoint_of_an_unfused_adam_resumes_fused(llama_dir: Path, tmp_path: Path) -> None:
    """A load replaces the optimizer's param groups with the saved ones; fused Adam (fp32 on CPU) is set again."""
    policy_cfg = make_policy(llama_dir)
    saved = HFPolicy(policy=policy_cfg, num_steps=4, seed=0)
    assert [group["fused"] for group in saved._optimizer.param_groups] == [True, True]
    for group in saved._optimizer.param_groups:  # as checkpoints written before fused Adam have them
        group["fused"] = None
    saved.save_checkpoint(tmp_path / "unfused")
    resumed = HFPolicy(policy=policy_cfg, num_steps=4, seed=1)
    resumed.load_checkpoint(tmp_path / "unfused")
    assert [group["fused"] for group in resumed._optimizer.param_groups] == [True, True]


def test_reference_logprobs_stay_at_the_initial_weights(llama_dir: Path) -> None:
    batch = make_batch(vocab_size=_vocab_size(llama_dir))
    policy = HFPolicy(policy=make_policy(llama_dir, logprob_micro_batch_size=3), num_steps=4, seed=0)
    initial = policy.get_logprobs(batch)
    policy.train(batch, LOSS)
    after_step = policy.get_logprobs(batch)
    reference = policy.get_reference_logprobs(batch)

    assert max_abs_diff(reference, initial) == 0.0
    assert max_abs_diff(after_step, initial) > 0.05
    # the current weights were swapped back in
    assert max_abs_diff(policy.get_logprobs(batch), after_step) == 0.0
    # the alignment: 0 at t = 0 and on padding, negative on real tokens after the first
    sequence_mask = batch["prompt_mask"] | batch["response_mask"]
    assert (initial[:, 0] == 0).all() and (initial[~sequence_mask] == 0).all()
    assert (initial[:, 1:][sequence_mask[:, 1:]] < 0).all()


def test_export_skips_the_tied_head_and_save_hf_reloads(tied_qwen2_dir: Path, tmp_path: Path) -> None:
    batch = make_batch(vocab_size=_vocab_size(tied_qwen2_dir))
    policy = HFPolicy(policy=make_policy(tied_qwen2_dir), num_steps=2, seed=0)
    policy.train(batch, LOSS)
    exported = _weights(policy)
    state_names = set(policy.model.state_dict())
    assert set(exported) == state_names - {"lm_head.weight"}
    assert policy.export_hf_weights_to(tmp_path / "weights.pt") == len(exported)

    policy.save_hf(tmp_path / "hf")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert max_weight_diff({name: reloaded.state_dict()[name] for name in exported}, exported) == 0.0
    assert len(AutoTokenizer.from_pretrained(tmp_path / "hf")) == _vocab_size(tied_qwen2_dir)


def test_learning_rate_schedule_warmup_then_cosine(llama_dir: Path) -> None:
    policy_cfg = make_policy(llama_dir)
    optimizer_cfg = policy_cfg.optimizer.model_copy(update={"warmup_steps": 2, "decay": "cosine", "min_lr": 1e-4})
    schedule = build_lr_scheduler(optimizer_cfg=optimizer_cfg, num_steps=6)
    expected = [5e-4, 1e-3] + [1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * k / 4)) for k in range(4)] + [1e-4]
    assert [schedule.lr_at(step) for step in range(7)] == pytest.approx(expected)

    batch = make_batch(vocab_size=_vocab_size(llama_dir), num_samples=4)
    policy = HFPolicy(policy=policy_cfg.model_copy(update={"optimizer": optimizer_cfg}), num_steps=6, seed=0)
    assert [policy.train(batch, LOSS)["lr"] for _ in range(3)] == pytest.approx(expected[:3])


def _hand_loss(logprobs: torch.Tensor, batch, loss) -> tuple[float, float, float]:
    """Loss, low and high clip fractions of `loss` (no TIS, no KL) on one mini-batch, from the formula."""
    valid = batch["response_mask"]
    ratio = (logprobs - batch["old_logprobs"]).exp()
    advantages = batch["advantages"][:, None].expand_as(ratio)
    weights = torch.tensor([loss.loss_weight if kind == "correction" else 1.0 for kind in batch["sample_kind"]])
    # l_t = -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) * w, summed over valid tokens / their count
    clipped = ratio.clamp(1 - loss.clip_low, 1 + loss.clip_high)
    per_token = -torch.minimum(ratio * advantages, clipped * advantages) * weights[:, None]
    count = valid.sum().item()
    low = (valid & (advantages < 0) & (ratio < 1 - loss.clip_low)).sum().item() / count
    high = (valid & (advantages > 0) & (ratio > 1 + loss.clip_high)).sum().item() / count
    return per_token[valid].sum().item() / count, low, high


def test_mini_batches_make_the_clip_bind_and_match_a_hand_computation(llama_dir: Path) -> None:
    """Two epochs of four mini-batches: pi_old stays the rollout policy, so after the first optimizer step the
    ratio leaves 1 and the clip ranges bind; each step's loss equals the clipped surrogate computed by hand."""
    loss = dataclasses.replace(LOSS, importance_sampling=False)
    policy = HFPolicy(policy=make_policy(llama_dir, micro_batch_size=2), num_steps=8, seed=0)
    batch = make_batch(vocab_size=_vocab_size(llama_dir))
    batch["old_logprobs"] = policy.get_logprobs(batch)  # on-policy: pi_old is the policy that sampled
    plan = plan_mini_batches(len(batch), size=2, epochs=2, generator=torch.Generator().manual_seed(0))
    assert len(plan) == 8 and sorted(sum(plan[:4], [])) == list(range(8))
    steps = []
    for indices in plan:
        mini_batch = batch.select(indices)
        expected_loss, expected_low, expected_high = _hand_loss(policy.get_logprobs(mini_batch), mini_batch, loss)
        metrics = policy.train(mini_batch, loss)
        assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-5, abs=1e-7)
        assert metrics["clip_fraction_low"] == pytest.approx(expected_low, abs=1e-6)
        assert metrics["clip_fraction_high"] == pytest.approx(expected_high, abs=1e-6)
        steps.append(metrics)
    assert steps[0]["ratio_min"] == pytest.approx(1.0, abs=1e-5) and steps[0]["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert steps[0]["clip_fraction_low"] == steps[0]["clip_fraction_high"] == 0.0
    combined = combine_optimizer_steps(steps)
    assert combined["optimizer_steps"] == 8 and combined["num_valid_tokens"] == 2 * batch.num_valid_tokens()
    assert combined["clip_fraction_low"] + combined["clip_fraction_high"] > 0


def test_a_step_without_the_pi_old_pass_takes_the_same_step(llama_dir: Path) -> None:
    """One on-policy optimizer step: pi_old from a separate logprob pass, or from the training pass itself."""
    loss = dataclasses.replace(LOSS, importance_sampling=False)
    batch = make_batch(vocab_size=_vocab_size(llama_dir))
    recomputed = HFPolicy(policy=make_policy(llama_dir, micro_batch_size=2), num_steps=4, seed=0)
    batch["old_logprobs"] = recomputed.get_logprobs(batch)
    skipped = HFPolicy(policy=make_policy(llama_dir, micro_batch_size=2), num_steps=4, seed=0)
    without = Batch({key: value for key, value in batch.items() if key != "old_logprobs"})
    metrics_a, metrics_b = recomputed.train(batch, loss), skipped.train(without, loss)
    for name in ("loss", "grad_norm", "token_mult_prob_error", "clip_fraction_low", "ratio_mean"):
        assert metrics_b[name] == pytest.approx(metrics_a[name], rel=1e-6, abs=1e-9), name
    # not bit for bit: the training pass projects only the response positions, so its lm_head product has another
    # shape than the logprob pass's and rounds differently (logprobs 5e-7 apart, weights 3e-7)
    assert max_weight_diff(_weights(recomputed), _weights(skipped)) < STEP_WEIGHT_TOLERANCE / 10


def test_the_zero_advantage_skip_takes_the_same_steps(llama_dir: Path) -> None:
    """Mini-batches from the same start: the samples at A = 0 left out of every pass (with each mini-batch's
    normalizer kept) give the same gradients and weights as training on them."""
    batch = with_zero_advantages(make_batch(vocab_size=_vocab_size(llama_dir)))
    full_plan, skip_plan = skip_plans(batch, LOSS)
    assert all(step.indices for step in skip_plan)  # every mini-batch keeps a sample: every step is taken
    assert sum(len(step.indices) for step in skip_plan) == sum(len(step.indices) for step in full_plan) // 2
    policies = [HFPolicy(policy=make_policy(llama_dir, micro_batch_size=2), num_steps=4, seed=0) for _ in range(2)]
    per_step = []
    for policy, plan in zip(policies, (full_plan, skip_plan)):
        per_step.append([policy.train(batch.select(step.indices), LOSS, global_denominator=step.denominator)
                         for step in plan])
    for full, skipped in zip(*per_step, strict=True):
        assert skipped["grad_norm"] == pytest.approx(full["grad_norm"], rel=1e-5)
        assert skipped["loss"] == pytest.approx(full["loss"], rel=1e-5, abs=1e-8)
        assert skipped["lr"] == full["lr"]
    assert max_weight_diff(_weights(policies[0]), _weights(policies[1])) < STEP_WEIGHT_TOLERANCE / 10
    # a mutant: the same samples with only their own tokens as the normalizer take another step
    wrong = HFPolicy(policy=make_policy(llama_dir, micro_batch_size=2), num_steps=4, seed=0)
    for step in skip_plan:
        wrong.train(batch.select(step.indices), LOSS)
    assert max_weight_diff(_weights(policies[0]), _weights(wrong)) > STEP_WEIGHT_TOLERANCE


def test_a_step_without_gradient_is_not_taken_and_the_schedule_moves_on(llama_dir: Path) -> None:
    batch = make_batch(vocab_size=_vocab_size(llama_dir))
    batch["advantages"][:] = 0.0
    policy = HFPolicy(policy=make_policy(llama_dir, micro_batch_size=2), num_steps=4, seed=0)
    before = _weights(policy)
    plan = plan_optimizer_steps(batch, LOSS, size=None, epochs=1, generator=torch.Generator().manual_seed(0),
                                carries_gradient=batch["advantages"] != 0)
    metrics = take_optimizer_steps(policy, batch, plan, LOSS)
    assert (metrics["optimizer_steps"], metrics["optimizer_steps_skipped"], metrics["loss"]) == (0.0, 1.0, 0.0)
    assert metrics["lr"] == pytest.approx(1e-3)  # the first step's lr of the linear decay to 0 over 4 steps
    assert max_weight_diff(before, _weights(policy)) == 0.0
    batch["advantages"][0] = 1.0
    assert policy.train(batch, LOSS)["lr"] == pytest.approx(0.75e-3)  # the next step takes the next lr
