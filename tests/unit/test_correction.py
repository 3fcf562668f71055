"""The correction stream: anchors, correction prompt text, shaping, the rho controller, the joint batch."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cipo_nemo.algorithms.anchors import AnchorSelection, select_anchors
from cipo_nemo.algorithms.correction import CorrectionMetrics, join_streams, shape_correction_rewards
from cipo_nemo.algorithms.rho import RhoController
from cipo_nemo.config.loader import load_config
from cipo_nemo.config.schema import CorrectionTemplates, RhoConfig
from cipo_nemo.data.correction_prompts import build_correction_prompt, remove_thinking, truncate_left
from cipo_nemo.data.batch import Batch
from cipo_nemo.models.tiny import build_tiny_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]

# ----- anchor selection ---------------------------------------------------------------------------------------

# 4 prompts x 4 rollouts. Accuracies: group 0 -> 0/4 = 0, group 1 -> 1/4 = 0.25, group 2 -> 2/4 = 0.5,
# group 3 -> 4/4 = 1.0. Window [0.25, 0.75] (inclusive) holds groups 1 and 2.
#   successful rollouts: in window {4 (g1), 8, 10 (g2)}, outside {12, 13, 14, 15 (g3)}
#   failed rollouts:     in window {5, 6, 7 (g1), 9, 11 (g2)}, outside {0, 1, 2, 3 (g0)}
REWARDS = torch.tensor([0.0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 1, 0, 1, 1, 1, 1])
GROUP_IDS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3])


def _select(*, rho: float, max_anchors: int, fallback: bool, seed: int = 0) -> AnchorSelection:
    return select_anchors(
        REWARDS,
        GROUP_IDS,
        rho=rho,
        max_anchors_per_step=max_anchors,
        difficulty_low=0.25,
        difficulty_high=0.75,
        allow_out_of_window=fallback,
        generator=torch.Generator().manual_seed(seed),
    )


def _groups_of(indices: list[int]) -> list[int]:
    return [int(GROUP_IDS[i]) for i in indices]


def test_prompt_accuracy_and_window() -> None:
    selection = _select(rho=0.5, max_anchors=4, fallback=False)
    assert selection.prompt_accuracy == {0: 0.0, 1: 0.25, 2: 0.5, 3: 1.0}
    # n_s = floor(0.5 * 4 + 0.5) = 2, n_f = 2; one of each kind from each in-window prompt (1 and 2)
    assert selection.anchor_correct == [True, True, False, False]
    assert sorted(_groups_of(selection.indices[:2])) == [1, 2]
    assert sorted(_groups_of(selection.indices[2:])) == [1, 2]
    assert 4 in selection.indices  # group 1's only success
    assert set(selection.indices[:2]) - {4} <= {8, 10}
    assert set(selection.indices[2:]) <= {5, 6, 7, 9, 11}
    assert selection.in_window == [True] * 4
    assert (selection.num_successful, selection.num_failed, selection.num_in_window, selection.num_fallback) == (
        2, 2, 4, 0,
    )


@pytest.mark.parametrize(
    ("rho", "expected_successful", "expected_failed"),
    [
        (0.0, 0, 4),  # floor(0 + 0.5) = 0
        (0.25, 1, 3),  # floor(1.0 + 0.5) = 1
        (0.375, 2, 2),  # floor(1.5 + 0.5) = 2
        (0.625, 3, 1),  # floor(2.5 + 0.5) = 3 (banker's round(2.5) would give 2)
        (1.0, 4, 0),  # 3 in-window successes + 1 from group 3
    ],
)
def test_counts_by_kind_follow_rho_rounded_half_up(rho: float, expected_successful: int, expected_failed: int) -> None:
    selection = _select(rho=rho, max_anchors=4, fallback=True)
    assert (selection.num_successful, selection.num_failed) == (expected_successful, expected_failed)
    assert selection.anchor_correct == [True] * expected_successful + [False] * expected_failed
    assert all(bool(REWARDS[i] > 0.5) == correct for i, correct in zip(selection.indices, selection.anchor_correct))


def test_shortage_is_not_filled_with_the_other_kind() -> None:
    # rho = 1, 8 anchors: 8 successes asked, 0 failures; only 3 successes are in window
    without_fallback = _select(rho=1.0, max_anchors=8, fallback=False)
    assert sorted(without_fallback.indices) == [4, 8, 10]
    assert without_fallback.num_failed == 0
    # with fallback: 3 in window + all 4 of group 3 = 7 < 8, still no failed anchor
    with_fallback = _select(rho=1.0, max_anchors=8, fallback=True)
    assert len(with_fallback) == 7
    assert with_fallback.num_failed == 0
    assert with_fallback.in_window == [True] * 3 + [False] * 4  # in-window tier first
    assert sorted(with_fallback.indices[3:]) == [12, 13, 14, 15]
    assert (with_fallback.num_in_window, with_fallback.num_fallback) == (3, 4)


def test_fallback_fills_from_out_of_window_prompts_only_when_allowed() -> None:
    # rho = 0, 8 failed anchors asked: 5 failed rollouts in window, then 3 of group 0's 4
    with_fallback = _select(rho=0.0, max_anchors=8, fallback=True)
    assert sorted(with_fallback.indices[:5]) == [5, 6, 7, 9, 11]
    assert _groups_of(with_fallback.indices[5:]) == [0, 0, 0]
    assert with_fallback.in_window == [True] * 5 + [False] * 3
    without_fallback = _select(rho=0.0, max_anchors=8, fallback=False)
    assert sorted(without_fallback.indices) == [5, 6, 7, 9, 11]
    assert without_fallback.num_fallback == 0


@pytest.mark.parametrize(
    ("max_anchors", "expected_per_group"),
    [
        (2, {1: 1, 2: 1}),  # round 1: one from each in-window prompt
        (4, {1: 2, 2: 2}),  # round 2: again one from each
        (5, {1: 3, 2: 2}),  # round 3: group 2's two failures are used up, group 1 gives its third
    ],
)
def test_anchors_are_spread_one_per_prompt_per_round(max_anchors: int, expected_per_group: dict[int, int]) -> None:
    for seed in range(5):
        selection = _select(rho=0.0, max_anchors=max_anchors, fallback=False, seed=seed)
        groups = _groups_of(selection.indices)
        assert {group: groups.count(group) for group in set(groups)} == expected_per_group
        assert sorted(groups[:2]) == [1, 2]  # the first round visits both prompts
        assert len(set(selection.indices)) == len(selection.indices)


def test_selection_is_deterministic_for_a_generator_seed() -> None:
    first = _select(rho=0.5, max_anchors=6, fallback=True, seed=7)
    again = _select(rho=0.5, max_anchors=6, fallback=True, seed=7)
    assert first == again
    outcomes = {tuple(_select(rho=0.5, max_anchors=6, fallback=True, seed=seed).indices) for seed in range(20)}
    assert len(outcomes) > 1  # the generator, not a fixed order, decides


def test_zero_anchors_gives_an_empty_selection() -> None:
    selection = _select(rho=0.5, max_anchors=0, fallback=True)
    assert selection.indices == [] and selection.num_successful == 0 and selection.num_fallback == 0


@pytest.mark.parametrize(
    "overrides",
    [{"rho": 1.5}, {"rho": -0.1}, {"rewards": REWARDS[:3]}],
)
def test_select_anchors_rejects_bad_arguments(overrides: dict) -> None:
    # the config-derived arguments (cap, window) are validated by the schema (tests/unit/test_config.py)
    arguments = dict(
        rewards=REWARDS, rho=0.5, max_anchors_per_step=4, difficulty_low=0.25, difficulty_high=0.75,
        allow_out_of_window=True,
    ) | overrides
    rewards = arguments.pop("rewards")
    with pytest.raises(ValueError):
        select_anchors(rewards, GROUP_IDS, generator=torch.Generator().manual_seed(0), **arguments)


def test_finished_rollouts_are_preferred_over_truncated_ones_within_a_class() -> None:
    # every in-window failed rollout except 9 was cut at max_new_tokens: 9 must be the first failed pick
    truncated = [i in {5, 6, 7, 11} for i in range(16)]
    selection = select_anchors(REWARDS, GROUP_IDS, rho=0.0, max_anchors_per_step=3, difficulty_low=0.25,
                               difficulty_high=0.75, allow_out_of_window=True,
                               generator=torch.Generator().manual_seed(0), truncated=truncated)
    assert selection.indices[0] == 9
    # the class order stays: truncated in-window rollouts still come before out-of-window ones
    assert all(selection.in_window) and selection.truncated == [False, True, True]
    assert selection.num_truncated == 2
    # nothing truncated: exactly the selection without the argument (same draws)
    plain = _select(rho=0.5, max_anchors=6, fallback=True, seed=3)
    same = select_anchors(REWARDS, GROUP_IDS, rho=0.5, max_anchors_per_step=6, difficulty_low=0.25,
                          difficulty_high=0.75, allow_out_of_window=True,
                          generator=torch.Generator().manual_seed(3), truncated=[False] * 16)
    assert same.indices == plain.indices and same.num_truncated == 0


def test_anchor_selection_rejects_lists_of_different_lengths() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        AnchorSelection(indices=[1, 2], anchor_correct=[True], in_window=[True, True], prompt_accuracy={})


# ----- correction prompt text ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>a + b</think>The answer is 3.", "The answer is 3."),
        ("<think>one</think>X<think>two\nlines</think> Y\n", "X Y"),  # every block removed
        ("reasoning without an opening tag\n</think>\n\nFinal: 4", "Final: 4"),  # Qwen3: <think> is in the prompt
        ("a</think>b<think>c</think>d", "bd"),  # blocks first, then the dangling prefix
        ("Answer 5 <think>cut off mid-thought", "Answer 5"),  # unclosed <think> up to the end
        ("<think>never finished", ""),
        ("  no tags at all \n", "no tags at all"),
    ],
)
def test_strip_thinking(text: str, expected: str) -> None:
    assert remove_thinking(text) == expected


def _num_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_truncate_left_unchanged_when_it_fits(tokenizer) -> None:
    text = "The answer is \\boxed{19}."  # 9 tokens: Th|e| answer| is| \|boxed|{|19|}.
    assert truncate_left(text, tokenizer=tokenizer, max_tokens=9) == text


def test_truncate_left_keeps_the_tail_and_the_budget_covers_the_marker(tokenizer) -> None:
    # "..." is 3 tokens, so 8 tokens leave 5 for the tail: " \", "boxed", "{", "19", "}."
    result = truncate_left("The answer is \\boxed{19}.", tokenizer=tokenizer, max_tokens=8)
    assert result == "... \\boxed{19}."
    assert _num_tokens(tokenizer, result) <= 8
    # 10 one-token "x": budget 6 = 3 for "..." + 3 x's
    assert truncate_left("x" * 10, tokenizer=tokenizer, max_tokens=6) == "...xxx"


def test_truncate_left_without_room_for_the_marker_keeps_only_the_tail(tokenizer) -> None:
    assert truncate_left("x" * 10, tokenizer=tokenizer, max_tokens=2) == "xx"
    assert truncate_left("x" * 10, tokenizer=tokenizer, max_tokens=3) == "xxx"  # marker + 0 tokens is no use


def test_truncate_left_never_splits_a_character(tokenizer) -> None:
    # each "é" is 2 byte-level tokens; budget 6 = "..." (3) + 3 tokens, but 1.5 characters do not exist
    result = truncate_left("éééé", tokenizer=tokenizer, max_tokens=6)
    assert result == "...é"
    assert "\ufffd" not in result


def test_truncate_left_rejects_a_zero_budget(tokenizer) -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        truncate_left("abc", tokenizer=tokenizer, max_tokens=0)


TEMPLATES = CorrectionTemplates(
    math="Problem: {problem}\nAttempt: {attempt}\nReview it. Answer in \\boxed{}.",
    code="{problem}\n```{language}\n{attempt}\n```\nFix it in one ```{language} block.",
)


def _prompt(tokenizer, **overrides) -> str:
    arguments = dict(
        problem="Compute $\\frac{1}{2}+\\frac{1}{2}$.",
        attempt="<think>hmm</think>\nSo the answer is \\boxed{1}.",
        family="math",
        templates=TEMPLATES,
        tokenizer=tokenizer,
        attempt_max_tokens=1000,
        strip_thinking=True,
    ) | overrides
    return build_correction_prompt(**arguments)


def test_math_prompt_is_the_template_with_literal_substitution(tokenizer) -> None:
    expected = (
        "Problem: Compute $\\frac{1}{2}+\\frac{1}{2}$.\n"
        "Attempt: So the answer is \\boxed{1}.\n"
        "Review it. Answer in \\boxed{}."
    )
    assert _prompt(tokenizer) == expected


def test_thinking_is_kept_when_strip_think_is_off(tokenizer) -> None:
    prompt = _prompt(tokenizer, attempt="<think>hmm</think> 2", strip_thinking=False)
    assert prompt.splitlines()[1] == "Attempt: <think>hmm</think> 2"


def test_placeholders_inside_the_problem_are_not_substituted_again(tokenizer) -> None:
    prompt = _prompt(tokenizer, problem="What do {attempt} and {language} mean?", attempt="42")
    assert prompt == "Problem: What do {attempt} and {language} mean?\nAttempt: 42\nReview it. Answer in \\boxed{}."


def test_code_prompt_quotes_the_last_code_block(tokenizer) -> None:
    response = (
        "First try:\n```python\ndef f():\n    return 1\n```\n"
        "Better:\n```python\ndef add(a, b):\n    return a - b\n```\nDone."
    )
    prompt = _prompt(tokenizer, problem="Write add.", attempt=response, family="code")
    assert prompt == "Write add.\n```python\ndef add(a, b):\n    return a - b\n```\nFix it in one ```python block."


@pytest.mark.parametrize(
    ("response", "quoted"),
    [
        ("def add(a, b):\n    return a + b\n", "def add(a, b):\n    return a + b"),  # no fence: the whole text
        ("Here:\n```cpp\nint main() {\n", "int main() {"),  # cut off inside a fence
    ],
)
def test_code_prompt_without_a_closed_block(tokenizer, response: str, quoted: str) -> None:
    prompt = _prompt(tokenizer, problem="P", attempt=response, family="code", language="cpp")
    assert prompt == f"P\n```cpp\n{quoted}\n```\nFix it in one ```cpp block."


def test_long_attempt_is_left_truncated_inside_the_prompt(tokenizer) -> None:
    prompt = _prompt(tokenizer, attempt="x" * 10, attempt_max_tokens=6)
    assert prompt.splitlines()[1] == "Attempt: ...xxx"


def test_prompt_never_reveals_a_verdict(tokenizer) -> None:
    templates = load_config(REPO_ROOT / "conf" / "cipo_base.yaml").cipo.templates
    verdict = re.compile(r"\b(in)?correct\b|\bwrong\b|\bverdict\b|\bfailed\b|\bpassed\b", re.IGNORECASE)
    for family, attempt in (("math", "So x = \\boxed{3}."), ("code", "```python\nprint(3)\n```")):
        prompt = _prompt(tokenizer, problem="Find x.", attempt=attempt, family=family, templates=templates)
        template = getattr(templates, family)
        assert len(verdict.findall(prompt)) == len(verdict.findall(template))
    assert verdict.findall(_prompt(tokenizer)) == []  # the test template has no such word at all


def test_templates_may_be_any_object_with_math_and_code(tokenizer) -> None:
    templates = SimpleNamespace(math="[{problem}|{attempt}]", code="unused")
    assert _prompt(tokenizer, problem="p", attempt="a", templates=templates) == "[p|a]"


def test_unknown_family_is_rejected(tokenizer) -> None:
    with pytest.raises(ValueError, match="family"):
        _prompt(tokenizer, family="poetry")


# ----- risk-averse shaping ------------------------------------------------------------------------------------


def test_shaping_penalizes_only_broken_correct_anchors() -> None:
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    anchor_correct = torch.tensor([True, True, False, False, True])
    # r~ = r - 1 * 1[anchor correct and r <= 0]: samples 1 and 4 are correct -> wrong
    assert shape_correction_rewards(rewards, anchor_correct, 1.0).tolist() == [1.0, -1.0, 1.0, 0.0, -1.0]
    assert shape_correction_rewards(rewards, anchor_correct, 0.5).tolist() == [1.0, -0.5, 1.0, 0.0, -0.5]
    assert rewards.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]  # a new tensor; the input is untouched


def test_shaping_uses_the_success_threshold_of_anchor_selection() -> None:
    # partial rewards: 0.3 is not a success (<= 0.5), so breaking a correct anchor with it is penalized; 0.75 is not
    rewards = torch.tensor([0.3, 0.75, 0.3])
    anchor_correct = torch.tensor([True, True, False])
    assert shape_correction_rewards(rewards, anchor_correct, 1.0).tolist() == pytest.approx([-0.7, 0.75, 0.3])


def test_shaping_validates_its_inputs() -> None:
    with pytest.raises(ValueError, match="anchor_correct"):
        shape_correction_rewards(torch.zeros(3), torch.tensor([True, False]), 1.0)
    # a negative cipo.risk_penalty is rejected by the schema (tests/unit/test_config.py)


# ----- rho controller -----------------------------------------------------------------------------------------

RHO_DEFAULTS = dict(
    min=0.2, max=0.8, init=0.3, tau=0.8, tau_margin=0.05, rule="multiplicative",
    w_level=0.8, w_drop=0.3, w_streak=0.05, streak_cap=3, eta=0.5,
)


def _controller(**overrides) -> RhoController:
    return RhoController(RhoConfig(**(RHO_DEFAULTS | overrides)))


def test_multiplicative_trajectory() -> None:
    controller = _controller()
    # ret 0.5: f1 = 0.3, f2 = 0 (no previous), k = 1 -> 1 + 0.24 + 0 + 0.05 = 1.29; 0.3 * 1.29 = 0.387
    assert controller.update(0.5) == pytest.approx(0.387)
    # ret 0.4: f1 = 0.4, f2 = 0.1, k = 2 -> 1 + 0.32 + 0.03 + 0.10 = 1.45; 0.387 * 1.45 = 0.56115
    assert controller.update(0.4) == pytest.approx(0.56115)
    # ret 0.9: f1 = -0.1, f2 = max(0, 0.4 - 0.9) = 0, k = 0 -> 1 - 0.08 = 0.92; 0.56115 * 0.92 = 0.516258
    assert controller.update(0.9) == pytest.approx(0.516258)
    assert controller.rho == pytest.approx(0.516258)


def test_multiplicative_streak_is_capped() -> None:
    controller = _controller(w_level=0.0, w_drop=0.0, w_streak=0.1, streak_cap=2)
    # factor 1 + 0.1 * min(k, 2): k = 1, 2, 3 -> 1.1, 1.2, 1.2
    # 0.3 * 1.1 = 0.33; 0.33 * 1.2 = 0.396; 0.396 * 1.2 = 0.4752
    assert [controller.update(0.5) for _ in range(3)] == pytest.approx([0.33, 0.396, 0.4752])


def test_proportional_trajectory() -> None:
    controller = _controller(rule="proportional")
    # rho + 0.5 * (0.8 - ret): 0.3 + 0.15 = 0.45; 0.45 + 0.3 = 0.75; 0.75 - 0.1 = 0.65
    assert [controller.update(r) for r in (0.5, 0.2, 1.0)] == pytest.approx([0.45, 0.75, 0.65])
    # 0.65 + 0.4 = 1.05 -> clipped to max 0.8
    assert controller.update(0.0) == 0.8


def test_rho_stays_within_bounds() -> None:
    controller = _controller()
    # ret 0: 0.3 * (1 + 0.64 + 0.05) = 0.507; 0.507 * (1 + 0.64 + 0 + 0.1) = 0.88218 -> 0.8
    assert controller.update(0.0) == pytest.approx(0.507)
    assert controller.update(0.0) == 0.8
    # ret 1: factor 1 - 0.16 = 0.84 each step; 0.8 * 0.84^8 = 0.198 < 0.2, so the floor is reached by step 8
    trajectory = [controller.update(1.0) for _ in range(10)]
    assert trajectory[0] == pytest.approx(0.672)
    assert all(0.2 <= rho <= 0.8 for rho in trajectory)
    assert trajectory[-1] == 0.2


def test_none_retention_changes_nothing() -> None:
    controller = _controller()
    controller.update(0.5)
    before = controller.state_dict()
    assert controller.update(None) == pytest.approx(0.387)
    assert controller.state_dict() == before
    # the next step sees prev_ret = 0.5 and streak 1 as if the None step had not happened: 0.56115
    assert controller.update(0.4) == pytest.approx(0.56115)


def test_state_round_trip_continues_identically() -> None:
    original = _controller()
    original.update(0.5)
    original.update(0.4)
    state = original.state_dict()
    assert state["rho"] == pytest.approx(0.56115)
    assert (state["prev_retention"], state["streak"]) == (0.4, 2)
    restored = _controller()
    restored.load_state_dict(state)
    # ret 0.7 after the history (prev 0.4, streak 2): f1 = 0.1, f2 = 0, k = 3
    #   -> 1 + 0.08 + 0 + 0.15 = 1.23; 0.56115 * 1.23 = 0.6902145
    assert restored.update(0.7) == original.update(0.7) == pytest.approx(0.6902145)
    for retention in (0.9, 0.6, 0.3):
        assert restored.update(retention) == original.update(retention)
    assert restored.state_dict() == original.state_dict()
    # the history matters: a controller with the same rho but none (k = 1) gives 1.13 * 0.56115 = 0.6340995
    assert _controller(init=state["rho"]).update(0.7) == pytest.approx(0.6340995)


def test_load_state_rejects_bad_state() -> None:
    with pytest.raises(ValueError, match="keys"):
        _controller().load_state_dict({"rho": 0.5})
    with pytest.raises(ValueError, match="outside"):
        _controller().load_state_dict(_controller().state_dict() | {"rho": 0.9})


@pytest.mark.parametrize(
    "overrides",
    [{"rule": "exponential"}, {"init": 0.9}, {"min": 0.9}, {"w_drop": -0.1}, {"streak_cap": -1}, {"tau": 1.5}],
)
def test_rho_controller_rejects_bad_arguments(overrides: dict) -> None:
    with pytest.raises(ValueError):
        _controller(**overrides)


def test_rho_controller_accepts_the_config_block() -> None:
    rho_config = load_config(REPO_ROOT / "conf" / "cipo_base.yaml").cipo.rho
    controller = RhoController(rho_config)
    assert controller.rho == rho_config.init


# ----- joint training batch -----------------------------------------------------------------------------------


def _base_batch() -> Batch:
    # 2 prompts (group ids 3 and 7) x 2 rollouts, T = 3
    return Batch(
        {
            "group_id": torch.tensor([3, 3, 7, 7]),
            "sample_kind": ["base"] * 4,
            "input_ids": torch.arange(1, 13).reshape(4, 3),
            "response_mask": torch.tensor([[False, True, True]] * 4),
            "rewards": torch.tensor([1.0, 0.0, 1.0, 0.0]),
        }
    )


ANCHORS = AnchorSelection(
    indices=[0, 1, 3],
    anchor_correct=[True, False, False],
    in_window=[True, True, False],
    prompt_accuracy={3: 0.5, 7: 0.5},
)


def _correction_batch(**overrides) -> Batch:
    # 3 anchors x 2 corrections, local group ids 0..2, T = 5
    fields = {
        "group_id": torch.tensor([0, 0, 1, 1, 2, 2]),
        "sample_kind": ["correction"] * 6,
        "input_ids": torch.arange(100, 130).reshape(6, 5),
        "response_mask": torch.tensor([[False, False, True, True, True]] * 6),
        "rewards": torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0]),
        "anchor_index": torch.tensor([0, 0, 1, 1, 2, 2]),
    } | overrides
    return Batch(fields)


def test_training_batch_joins_both_streams() -> None:
    merged, metrics = join_streams(
        _base_batch(), _correction_batch(), anchors=ANCHORS, rho=0.3
    )
    # correction ids: max base id 7 + 1 + local id -> 8, 9, 10
    assert merged["group_id"].tolist() == [3, 3, 7, 7, 8, 8, 9, 9, 10, 10]
    assert merged["sample_kind"] == ["base"] * 4 + ["correction"] * 6
    assert merged["anchor_index"].tolist() == [-1] * 4 + [0, 0, 1, 1, 2, 2]
    # the verifier's rewards, unshaped (training_signal shapes them, once)
    assert merged["rewards"].tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    # only anchor 0 is correct
    assert merged["anchor_correct"].tolist() == [False] * 4 + [True, True, False, False, False, False]
    # base rows (T = 3) are right-padded to T = 5 with 0 ids and False masks
    assert merged["input_ids"].shape == (10, 5)
    assert merged["input_ids"][0].tolist() == [1, 2, 3, 0, 0]
    assert merged["response_mask"][0].tolist() == [False, True, True, False, False]
    assert merged["input_ids"][4].tolist() == [100, 101, 102, 103, 104]


def test_training_batch_metrics() -> None:
    _, metrics = join_streams(_base_batch(), _correction_batch(), anchors=ANCHORS, rho=0.3)
    assert metrics == CorrectionMetrics(
        anchors_total=3,
        anchors_successful=1,
        anchors_failed=2,
        anchors_in_window=2,
        anchors_fallback=1,
        anchors_truncated=0,
        correction_samples=6,
        correction_reward_mean=pytest.approx(2 / 6),  # raw rewards 1+0+1+0+0+0 over 6
        correction_success=0.25,  # failed anchors 1 and 2: raw (1 + 0 + 0 + 0) / 4
        retention=0.5,  # correct anchor 0: raw (1 + 0) / 2
        rho=0.3,
    )
    logged = metrics.as_dict()
    assert logged["cipo/retention"] == 0.5 and logged["cipo/anchors_total"] == 3.0
    assert set(metrics.as_dict(prefix="x/")) == {f"x/{key[len('cipo/'):]}" for key in logged}


def test_training_batch_leaves_its_inputs_alone() -> None:
    base, corrections = _base_batch(), _correction_batch()
    join_streams(base, corrections, anchors=ANCHORS, rho=0.3)
    assert "anchor_correct" not in base and "anchor_index" not in base
    assert corrections["group_id"].tolist() == [0, 0, 1, 1, 2, 2]
    assert corrections["rewards"].tolist() == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]


def test_without_corrections_the_base_batch_comes_back() -> None:
    merged, metrics = join_streams(_base_batch(), None, anchors=None, rho=0.3)
    assert merged["rewards"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert merged["anchor_index"].tolist() == [-1] * 4
    assert merged["group_id"].tolist() == [3, 3, 7, 7]
    assert (metrics.anchors_total, metrics.correction_samples) == (0, 0)
    assert metrics.retention is None and metrics.correction_success is None and metrics.correction_reward_mean is None
    assert metrics.as_dict()["cipo/retention"] is None
    assert metrics.as_dict()["cipo/rho"] == 0.3


def test_retention_is_none_without_a_correct_anchor() -> None:
    # only a failed anchor is corrected: no retention to measure
    anchors = AnchorSelection(indices=[1], anchor_correct=[False], in_window=[True], prompt_accuracy={3: 0.5, 7: 0.5})
    corrections = _correction_batch(
        group_id=torch.tensor([0, 0]),
        sample_kind=["correction"] * 2,
        input_ids=torch.zeros(2, 5, dtype=torch.long),
        response_mask=torch.ones(2, 5, dtype=torch.bool),
        rewards=torch.tensor([1.0, 1.0]),
        anchor_index=torch.tensor([0, 0]),
    )
    _, metrics = join_streams(_base_batch(), corrections, anchors=anchors, rho=0.2)
    assert metrics.retention is None
    assert metrics.correction_success == 1.0


@pytest.mark.parametrize(
    ("corrections", "message"),
    [
        (_correction_batch(sample_kind=["correction"] * 5 + ["base"]), "sample_kind"),
        (_correction_batch(anchor_index=torch.tensor([0, 0, 1, 1, 2, 3])), "out of range"),
        (_correction_batch(anchor_index=torch.tensor([0, 1, 1, 1, 2, 2])), "mixes"),
    ],
)
def test_bad_correction_batches_are_rejected(corrections: Batch, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        join_streams(_base_batch(), corrections, anchors=ANCHORS, rho=0.3)


def test_corrections_need_their_anchors_and_base_must_be_base() -> None:
    with pytest.raises(ValueError, match="anchors"):
        join_streams(_base_batch(), _correction_batch(), anchors=None, rho=0.3)
    with pytest.raises(ValueError, match="base"):
        join_streams(_correction_batch(), None, anchors=None, rho=0.3)
