"""A step's math in one place (algorithms/training_signal.py): the risk penalty applied once, DAPO's overlong
handling by hand-computed examples, what carries gradient, and the switch that skips the rest (only where exact)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cipo_nemo.algorithms import correction, training_signal as signal_module
from cipo_nemo.algorithms.anchors import AnchorSelection
from cipo_nemo.algorithms.correction import join_streams
from cipo_nemo.algorithms.training_signal import carries_gradient, overlong_penalty, training_signal
from cipo_nemo.config import load_config
from cipo_nemo.config.loader import ConfigError
from cipo_nemo.data.batch import Batch

BASE = Path(__file__).resolve().parents[2] / "conf" / "cipo_base.yaml"
MAX_NEW_TOKENS = 10


def _batch(kind: str, rewards: list[float], lengths: list[int], groups: list[int], finish: list[str]) -> Batch:
    width = 2 + max(lengths)
    response_mask = torch.zeros(len(rewards), width, dtype=torch.bool)
    for row, length in enumerate(lengths):
        response_mask[row, 2:2 + length] = True
    prompt_mask = torch.zeros_like(response_mask)
    prompt_mask[:, :2] = True
    return Batch({"group_id": torch.tensor(groups), "sample_kind": [kind] * len(rewards),
                  "input_ids": torch.ones(len(rewards), width, dtype=torch.long), "prompt_mask": prompt_mask,
                  "response_mask": response_mask, "rewards": torch.tensor(rewards), "finish_reason": finish})


def _step(**overrides: object) -> tuple[Batch, object]:
    """One prompt group of 4 base samples and two correction groups of 2 (a right anchor, then a wrong one)."""
    cfg = load_config(BASE, [f"{key}={value}" for key, value in overrides.items()])
    base = _batch("base", [1.0, 0.0, 1.0, 0.0], [4, 10, 9, 2], [0, 0, 0, 0], ["stop", "length", "stop", "stop"])
    corrections = _batch("correction", [0.0, 1.0, 1.0, 0.0], [3, 3, 3, 3], [0, 0, 1, 1], ["stop"] * 4)
    corrections["anchor_index"] = torch.tensor([0, 0, 1, 1])
    anchors = AnchorSelection(indices=[0, 1], anchor_correct=[True, False], in_window=[True, True],
                              prompt_accuracy={0: 0.5})
    joined, _ = join_streams(base, corrections, anchors=anchors, rho=0.5)
    return joined, cfg


def _signal(joined: Batch, cfg) -> Batch:
    return training_signal(joined, grpo=cfg.grpo, cipo=cfg.cipo, max_new_tokens=MAX_NEW_TOKENS)


def test_the_risk_penalty_is_applied_once_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = correction.shape_correction_rewards

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(signal_module, "shape_correction_rewards", counting)
    joined, cfg = _step()
    signal = _signal(joined, cfg)
    assert len(calls) == 1
    # the right anchor's wrong correction: 0 - lambda_risk; everything else keeps its verifier reward
    assert signal["shaped_rewards"].tolist() == [1.0, 0.0, 1.0, 0.0, -1.0, 1.0, 1.0, 0.0]
    assert signal["rewards"].tolist() == joined["rewards"].tolist()  # verifier rewards untouched


def test_stream_advantages_come_from_the_shaped_rewards_once() -> None:
    joined, cfg = _step()
    advantages = _signal(joined, cfg)["advantages"][4:]
    # retention group: r~ = [-1, 1], deviations -1, +1; fix group: r = [1, 0], deviations +0.5, -0.5;
    # one scale for the stream: sqrt(mean(1, 1, 0.25, 0.25)) = sqrt(0.625). Shaping twice would give r~ = [-2, 1].
    expected = torch.tensor([-1.0, 1.0, 0.5, -0.5]) / (0.625 ** 0.5 + cfg.grpo.std_eps)
    torch.testing.assert_close(advantages, expected)


def test_overlong_punishment_by_hand() -> None:
    # max 10 tokens, buffer 4: no punishment up to 6 tokens, then factor * (length - 6) / 4, factor at 10
    lengths = torch.tensor([2, 6, 7, 8, 10])
    assert overlong_penalty(lengths, max_new_tokens=10, buffer=4, factor=1.0).tolist() == [0.0, 0.0, 0.25, 0.5, 1.0]
    assert overlong_penalty(lengths, max_new_tokens=10, buffer=4, factor=0.5).tolist() == [0, 0, 0.125, 0.25, 0.5]
    assert overlong_penalty(lengths, max_new_tokens=10, buffer=0, factor=1.0).tolist() == [0.0] * 5


def test_overlong_punishment_shapes_both_streams_before_the_advantages() -> None:
    joined, cfg = _step(**{"grpo.overlong_buffer": 4})
    signal = _signal(joined, cfg)
    # base lengths 4, 10, 9, 2 -> punishment 0, 1, 0.75, 0; corrections are 3 tokens long: none
    assert signal["shaped_rewards"].tolist() == [1.0, -1.0, 0.25, 0.0, -1.0, 1.0, 1.0, 0.0]
    plain = _signal(*_step())
    assert not torch.equal(signal["advantages"][:4], plain["advantages"][:4])


def test_truncated_responses_leave_the_loss_but_count_in_their_group() -> None:
    joined, cfg = _step(**{"grpo.mask_truncated": "true"})
    signal = _signal(joined, cfg)
    plain = _signal(*_step())
    assert signal["response_mask"][1].sum() == 0 and joined["response_mask"][1].sum() == 10  # a new batch
    assert signal.num_valid_tokens() == plain.num_valid_tokens() - 10  # out of the normalizer too
    torch.testing.assert_close(signal["advantages"], plain["advantages"])  # same baseline: the group kept it
    assert not bool(carries_gradient(signal)[1]) and bool(carries_gradient(plain)[1])


def test_what_carries_gradient() -> None:
    batch = Batch({"group_id": torch.arange(4), "sample_kind": ["base"] * 4,
                   "advantages": torch.tensor([0.5, 0.0, -0.2, 0.3]),
                   "response_mask": torch.tensor([[True, True], [True, False], [True, False], [False, False]])})
    assert carries_gradient(batch).tolist() == [True, False, True, False]  # zero advantage; no trained token


@pytest.mark.parametrize(("overrides", "skips"), [
    ([], True),  # auto with kl_beta 0: exact, on
    (["loss.skip_zero_advantage=false"], False),
    (["loss.kl_beta=0.01", "policy.reference_policy=cpu_copy"], False),  # auto with KL: keeps every sample
    (["loss.skip_zero_advantage=true"], True),
])
def test_the_skip_is_on_by_default_where_it_is_exact(overrides: list[str], skips: bool) -> None:
    assert load_config(BASE, overrides).loss.skips_zero_advantage() is skips


def test_the_skip_is_refused_where_it_would_not_be_exact() -> None:
    with pytest.raises(ConfigError, match="loss.skip_zero_advantage: true is not exact with kl_beta = 0.01"):
        load_config(BASE, ["loss.kl_beta=0.01", "policy.reference_policy=cpu_copy", "loss.skip_zero_advantage=true"])


def test_the_overlong_buffer_must_leave_room() -> None:
    with pytest.raises(ConfigError, match=r"max_new_tokens \(256\) must exceed grpo.overlong_buffer"):
        load_config(BASE, ["grpo.overlong_buffer=256", "generation.max_new_tokens=256"])
