"""The real training loop on the in-process HF backends: a 2-step CIPO and a 2-step GRPO run write every metric,
a checkpoint, TensorBoard events and the curves PNG; killed-and-resumed equals uninterrupted."""

import json
from pathlib import Path

import pytest
import torch

from cipo_nemo.loop import train
from cipo_nemo.trainer import setup, shutdown
from cipo_nemo.config import load_config
from cipo_nemo.models.policy.hf_policy import CHECKPOINT_FILE
from cipo_nemo.samples import OUTCOMES, read_samples

pytestmark = pytest.mark.slow  # the training loop end to end

BASE = Path(__file__).resolve().parents[2] / "conf" / "cipo_base.yaml"

STEP_METRICS = [
    "reward/base_mean", "reward/base_pass_rate", "reward/correction_mean", "cipo/anchors_total",
    "cipo/anchors_successful", "cipo/anchors_failed", "cipo/correction_success", "cipo/retention", "cipo/rho",
    "cipo/rho_next", "cipo/rho_at_bound", "cipo/rho_tau", "cipo/correction_groups_live", "train/loss", "train/kl", "train/clip_fraction_low", "train/clip_fraction_high",
    "train/approx_entropy", "train/token_mult_prob_error", "train/grad_norm", "train/lr", "tokens/generated",
    "tokens/trained", "throughput/generated_tokens_per_s", "timing/rollout", "timing/correction_rollout",
    "timing/train", "timing/refit", "timing/dump_samples", "timing/step", "val/pass@1", "val/pass@4",
    "train/samples_skipped/base", "train/samples_skipped/correction", "train/tokens_trained/base",
    "train/tokens_trained/correction", "train/optimizer_steps_skipped",
]


def _overrides(model, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"run.output_dir={run_dir}", "grpo.num_steps=2", "grpo.prompts_per_step=4", "grpo.samples_per_prompt=4",
        "cipo.samples_per_anchor=4", "cipo.max_anchors_per_step=4", "cipo.attempt_max_tokens=32",
        "data.train.kind=file", f"data.train.file.path={model.train_file}",
        f"++data.validation={{kind: file, family: math, reasoning_gym: {{name: basic_arithmetic, size: 1, seed: 0, options: {{}}}}, file: {{path: {model.validation_file}, format: auto, split: null, fields: {{id: null, prompt: prompt, messages: null, answer: answer, family: null}}}}, hf: {{path: null, name: null, split: test, revision: null, fields: {{id: null, prompt: prompt, messages: null, answer: answer, family: null}}}}}}",
        "validation.every=2", "validation.samples_per_prompt=4", "validation.pass_k=[1,4]",
        "verifier.num_workers=1", f"policy.model_name={model.model_dir}", "policy.backend=hf", "policy.precision=fp32",
        "policy.micro_batch_size=8", "policy.max_total_sequence_length=384", "policy.optimizer.lr=1e-4",
        "policy.optimizer.min_lr=1e-4", "generation.backend=hf", "generation.max_new_tokens=12",
        "checkpointing.save_every=1", "logger.tensorboard=true", "logger.plot=true", *extra,
    ]


def _run(model, run_dir: Path, *extra: str):
    components = setup(load_config(BASE, _overrides(model, run_dir, *extra)))
    try:
        return train(components)
    finally:
        shutdown(components)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cipo_run_writes_every_metric(arithmetic_model, tmp_path):
    summary = _run(arithmetic_model, tmp_path / "cipo", "logger.samples_every=1")
    records = _records(tmp_path / "cipo")
    assert [r["step"] for r in records] == [1, 2]
    for key in STEP_METRICS:
        assert key in records[-1], key
    assert all(r["cipo/anchors_total"] > 0 for r in records)
    assert 0.0 < sum(r["reward/base_pass_rate"] for r in records) < 2.0  # the warm model is right sometimes
    assert all(r["train/token_mult_prob_error"] < 1.05 for r in records)  # HF sampler and trainer agree
    assert summary.plot is not None and summary.plot.stat().st_size > 0
    assert list((tmp_path / "cipo" / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "cipo" / "checkpoints" / "step_000002" / "COMPLETE").is_file()
    assert all(r["cipo/rho_at_bound"] in (0.0, 1.0) and r["cipo/rho_tau"] == 0.8 for r in records)
    assert summary.rho_at_bound_share == sum(r["cipo/rho_at_bound"] for r in records) / 2
    for step, record in zip((1, 2), records):
        _, samples = read_samples(tmp_path / "cipo", step)
        base = [s for s in samples if s["kind"] == "base"]
        corrections = [s for s in samples if s["kind"] == "correction"]
        assert len(base) == 16 and len(corrections) == record["cipo/correction_samples"] > 0
        assert all(s["prompt"] and s["item_id"] and s["verifier_reason"] for s in samples)
        for s in corrections:  # the anchor fields are those of the base sample it quotes
            anchor = base[s["anchor"]["index"]]
            assert (s["anchor"]["response"], s["anchor"]["reward"]) == (anchor["response"], anchor["reward"])
            assert s["outcome"] in OUTCOMES and s["anchor"]["correct"] == (anchor["reward"] > 0.5)
        assert sum(s["reward"] for s in base) / 16 == pytest.approx(record["reward/base_mean"])
        # the skip (on by default: no KL) leaves out exactly the samples the dump marks as carrying no gradient
        for kind, members in (("base", base), ("correction", corrections)):
            assert record[f"train/samples_skipped/{kind}"] == sum(not s["carries_gradient"] for s in members)
            assert all((s["advantage"] != 0) == s["carries_gradient"] for s in members)


def test_grpo_run_has_no_correction_stream(arithmetic_model, tmp_path):
    (tmp_path / "grpo").mkdir()
    (tmp_path / "grpo" / "SAVE_NOW").touch()  # an on-demand checkpoint after the first step
    summary = _run(arithmetic_model, tmp_path / "grpo", "cipo.enabled=false", "checkpointing.save_every=0",
                   "logger.samples_every=2")
    assert summary.rho_at_bound_share is None
    assert [path.name for path in (tmp_path / "grpo" / "samples").iterdir()] == ["step_2.jsonl"]
    assert {s["kind"] for s in read_samples(tmp_path / "grpo")[1]} == {"base"}
    checkpoints = sorted(p.name for p in (tmp_path / "grpo" / "checkpoints").glob("step_*"))
    assert checkpoints == ["step_000001", "step_000002"]
    assert not (tmp_path / "grpo" / "SAVE_NOW").exists()
    records = _records(tmp_path / "grpo")
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["cipo/anchors_total"] == 0 and r["reward/correction_mean"] is None for r in records)
    assert all(r["cipo/rho_at_bound"] is None and r["cipo/rho_tau"] is None for r in records)
    for r in records:
        assert r["tokens/trained"] > 0
        mixed_groups = r["reward/prompts_all_correct"] + r["reward/prompts_all_wrong"] < 1
        # zero-variance groups get exactly zero advantage, so a step without a mixed group has no gradient: it
        # takes no optimizer step at all (the skip)
        assert (r["train/grad_norm"] > 0) == mixed_groups == (r["train/optimizer_steps"] == 1), r
    assert any(r["train/grad_norm"] > 0 for r in records)


def test_resume_continues_exactly(arithmetic_model, tmp_path):
    # two epochs of shuffled mini-batches of 8 samples: several optimizer steps per RL step, pi_old fixed;
    # tau: auto is set at step 1 (from its retention) and must come back from the checkpoint, not from step 2
    mini_batches = ("validation.every=0", "policy.train_global_batch_size=8", "policy.epochs_per_batch=2",
                    "policy.optimizer.lr=3e-3", "policy.optimizer.min_lr=3e-3", "cipo.rho.tau=auto")
    _run(arithmetic_model, tmp_path / "straight", *mini_batches)
    # Same run stopped after step 1 (as if killed after its checkpoint), then resumed to step 2.
    _run(arithmetic_model, tmp_path / "resumed", *mini_batches, "grpo.num_steps=1")
    _run(arithmetic_model, tmp_path / "resumed", *mini_batches)
    straight, resumed = _records(tmp_path / "straight"), _records(tmp_path / "resumed")
    assert resumed[-1]["step"] == 2
    for record in straight:  # >= 16 base samples: at least 2 x 2 planned optimizer steps, and the clip ranges bind
        assert record["train/optimizer_steps"] + record["train/optimizer_steps_skipped"] >= 4
    assert sum(r["train/clip_fraction_low"] + r["train/clip_fraction_high"] for r in straight) > 0
    assert straight[0]["cipo/retention"] is not None and straight[0]["cipo/rho_tau"] is not None
    assert resumed[-1]["cipo/rho_tau"] == straight[0]["cipo/rho_tau"]
    for key in ("reward/base_mean", "train/loss", "train/grad_norm", "train/clip_fraction_low",
                "train/optimizer_steps", "cipo/rho", "cipo/rho_next", "tokens/generated"):
        assert resumed[-1][key] == pytest.approx(straight[-1][key], rel=1e-5, abs=1e-7), key
    weights = [torch.load(tmp_path / run / "checkpoints" / "step_000002" / "policy" / CHECKPOINT_FILE,
                          weights_only=True)["model"] for run in ("straight", "resumed")]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=1e-5, atol=1e-7, msg=name)


def test_keep_best_keeps_the_best_validated_checkpoint_across_a_resume(arithmetic_model, tmp_path):
    # GRPO, validation and a checkpoint every step, keep_last 1: two steps, then resumed to four
    best_of = ("cipo.enabled=false", "validation.every=1", "checkpointing.save_every=1", "checkpointing.keep_last=1",
               "checkpointing.keep_best=val/reward_mean", "logger.plot=false", "logger.tensorboard=false")
    _run(arithmetic_model, tmp_path / "run", *best_of)
    _run(arithmetic_model, tmp_path / "run", *best_of, "grpo.num_steps=4")
    records = _records(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    values = [r["val/reward_mean"] for r in records]
    best_step = values.index(max(values)) + 1  # the first of equals
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == sorted({f"step_{best_step:06d}", "step_000004"})
    best = json.loads((checkpoints / "best.json").read_text())
    assert (best["step"], best["value"], best["metric"]) == (best_step, max(values), "val/reward_mean")
    stored = json.loads((checkpoints / f"step_{best_step:06d}" / "metrics.json").read_text())["metrics"]
    assert stored == {key: value for key, value in records[best_step - 1].items() if key.startswith("val/")}


def test_kl_keeps_every_sample_in_the_passes(arithmetic_model, tmp_path):
    _run(arithmetic_model, tmp_path / "kl", "cipo.enabled=false", "validation.every=0", "grpo.num_steps=1",
         "loss.kl_beta=0.05", "policy.reference_policy=cpu_copy", "logger.samples_every=1")
    (record,) = _records(tmp_path / "kl")
    _, samples = read_samples(tmp_path / "kl", 1)
    assert record["train/samples_skipped/base"] == 0 and record["train/optimizer_steps"] == 1
    assert record["train/tokens_trained/base"] == record["tokens/trained"]  # every response token went through
    assert any(not s["carries_gradient"] for s in samples) or record["reward/prompts_all_correct"] == 0


def test_dynamic_sampling_and_overlong_handling_resume_exactly(arithmetic_model, tmp_path):
    """DAPO dynamic sampling (rounds until the batch's groups carry gradient), the soft overlong punishment and
    truncated responses masked: a run killed after step 1 and resumed samples and trains what the straight run
    did."""
    dapo = ("validation.every=0", "grpo.dynamic_sampling.enabled=true", "grpo.dynamic_sampling.max_rounds=3",
            "grpo.overlong_buffer=4", "grpo.mask_truncated=true", "logger.samples_every=1")
    _run(arithmetic_model, tmp_path / "straight", *dapo)
    _run(arithmetic_model, tmp_path / "resumed", *dapo, "grpo.num_steps=1")
    _run(arithmetic_model, tmp_path / "resumed", *dapo)
    straight, resumed = _records(tmp_path / "straight"), _records(tmp_path / "resumed")
    for record in straight:
        rounds, live = record["dynamic_sampling/rounds"], record["dynamic_sampling/groups_live"]
        assert 1 <= rounds <= 3 and record["dynamic_sampling/groups_sampled"] == 4 * rounds
        assert live >= 4 or rounds == 3  # it stops as soon as the batch can be filled
        assert record["dynamic_sampling/groups_short"] == max(0, 4 - live)
    assert any(r["dynamic_sampling/rounds"] > 1 for r in straight)  # the warm model leaves some groups constant
    for key in ("dynamic_sampling/rounds", "dynamic_sampling/groups_live", "reward/base_mean", "train/loss",
                "train/grad_norm", "train/samples_skipped/base", "cipo/anchors_total", "tokens/trained"):
        assert resumed[-1][key] == pytest.approx(straight[-1][key], rel=1e-5, abs=1e-7), key
    assert read_samples(tmp_path / "resumed", 2)[1] == read_samples(tmp_path / "straight", 2)[1]
    for step in (1, 2):
        for sample in read_samples(tmp_path / "straight", step)[1]:
            truncated = sample["finish_reason"] == "length"  # 12 tokens: punished by 1, and out of the loss
            assert sample["shaped_reward"] <= sample["reward"] - (1.0 if truncated else 0.0) + 1e-6
            assert not (truncated and sample["carries_gradient"])
