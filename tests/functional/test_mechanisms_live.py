"""Every CIPO switch changes training: from the same warm start, seeds and data, one step of the real loop (HF
backends) with a switch flipped must train differently from the default. A switch that stops acting (as the risk
penalty did under per-group std normalization) fails here."""

import json
from pathlib import Path

import pytest

from cipo_nemo.config import load_config
from cipo_nemo.loop import train
from cipo_nemo.trainer import setup, shutdown

pytestmark = pytest.mark.slow  # the training loop end to end

BASE = Path(__file__).resolve().parents[2] / "conf" / "cipo_base.yaml"
TRAIN_METRICS = ("train/loss", "train/grad_norm", "train/clip_fraction_low", "train/clip_fraction_high")


def _overrides(model, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"run.output_dir={run_dir}", "grpo.num_steps=1", "grpo.prompts_per_step=8", "grpo.samples_per_prompt=4",
        "cipo.samples_per_anchor=4", "cipo.max_anchors_per_step=8", "cipo.attempt_max_tokens=32",
        "cipo.rho.init=0.5", "data.train.kind=file", f"data.train.file.path={model.train_file}",
        "validation.every=0", "verifier.num_workers=1", f"policy.model_name={model.model_dir}", "policy.backend=hf",
        "policy.precision=fp32", "policy.micro_batch_size=16", "policy.max_total_sequence_length=384",
        "policy.optimizer.lr=1e-3", "policy.optimizer.min_lr=1e-3", "generation.backend=hf",
        "generation.max_new_tokens=12", "checkpointing.save_every=0", "checkpointing.save_hf_at_end=false",
        "logger.tensorboard=false", "logger.plot=false", *extra,
    ]


def _first_step(model, run_dir: Path, *extra: str) -> dict:
    components = setup(load_config(BASE, _overrides(model, run_dir, *extra)))
    try:
        train(components)
    finally:
        shutdown(components)
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])


@pytest.fixture(scope="module")
def default_step(arithmetic_model, tmp_path_factory):
    return _first_step(arithmetic_model, tmp_path_factory.mktemp("live") / "default")


def test_the_default_step_has_what_the_switches_act_on(default_step):
    assert default_step["cipo/anchors_successful"] > 0 and default_step["cipo/anchors_failed"] > 0
    assert 0 < default_step["cipo/retention"] < 1  # some right anchors kept, some broken: the penalty has work


@pytest.mark.parametrize("switch", [
    "cipo.risk_penalty=0.0",
    "cipo.advantage_mode=anchor",
    "cipo.advantage_mode=group",
    "cipo.loss_weight=0.5",
    "policy.train_global_batch_size=16",
])
def test_each_switch_changes_the_training_step(switch, arithmetic_model, default_step, tmp_path):
    flipped = _first_step(arithmetic_model, tmp_path / "flipped", switch)
    # the same start and seeds: the same rollouts and corrections
    for key in ("reward/base_mean", "reward/correction_mean", "cipo/anchors_total", "tokens/generated"):
        assert flipped[key] == default_step[key], key
    differences = {key: abs(flipped[key] - default_step[key]) for key in TRAIN_METRICS}
    assert max(differences.values()) > 1e-6, differences


def test_group_mode_makes_the_risk_penalty_inert(arithmetic_model, tmp_path):
    """The reason for advantage_mode stream: under per-group std the penalty cancels exactly."""
    with_penalty = _first_step(arithmetic_model, tmp_path / "group", "cipo.advantage_mode=group")
    without = _first_step(arithmetic_model, tmp_path / "group_no_penalty", "cipo.advantage_mode=group",
                          "cipo.risk_penalty=0.0")
    for key in ("train/loss", "train/grad_norm"):
        assert with_penalty[key] == pytest.approx(without[key], rel=1e-4, abs=1e-7), key
