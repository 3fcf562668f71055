"""Tests for cipo_nemo.environments.math and math_pool: extraction, fast path, math-verify fallback and the timeout pool."""

from __future__ import annotations

import os
import time

import pytest

import cipo_nemo.environments.math as math_env
from cipo_nemo.environments.math import (
    REASONS,
    MathVerdict,
    extract_answer,
    fast_path_reason,
    math_verify_equivalent,
    reason_counts,
    score_one,
    verify_math,
)
from cipo_nemo.environments.math_pool import MathVerifierPool, score_math_batch

STALL_ANSWER = "STALL"
CRASH_ANSWER = "CRASH"


def stall_or_crash_on_marker(pred_answer: str, gold_answer: str) -> bool:
    """Pool test hook (runs in the worker): hangs on STALL, kills its process on CRASH, else math-verify."""
    if pred_answer == STALL_ANSWER:
        time.sleep(3600)
    if pred_answer == CRASH_ANSWER:
        os._exit(1)
    return math_verify_equivalent(pred_answer, gold_answer)


# -- extraction ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("so x = \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("first \\boxed{1}, on reflection \\boxed{2}", "2"),
        ("\\fbox{ 9 }", "9"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("\\boxed{4} and an unclosed \\boxed{5", "4"),
        ("#### 3\nmore text\n#### 1,234\n", "1,234"),
        ("The answer is 7.", "7"),
        ("the answer is 5, no wait, The Final Answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
        ("The answer is **12**.", "12"),
        ("\\boxed{3}\n#### 4\nThe answer is 5", "3"),
        ("#### 4\nThe answer is 5", "4"),
        ("I think it is 42", None),
        ("\\boxed{}", None),
        ("", None),
    ],
)
def test_extract_answer(response: str, expected: str | None) -> None:
    assert extract_answer(response) == expected


# -- verdicts (in-process) -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "gold", "reason", "extracted"),
    [
        ("Thus \\boxed{\\frac{1}{2}}", "0.5", "correct", "\\frac{1}{2}"),
        ("\\boxed{1} ... actually \\boxed{2}", "2", "correct", "2"),
        ("\\boxed{1} ... actually \\boxed{2}", "1", "wrong", "2"),
        ("step 1 ...\n#### 1,234", "1234", "correct", "1,234"),
        ("The answer is 7.", "7", "correct", "7"),
        ("\\boxed{8}", "7", "wrong", "8"),
        ("I give up.", "7", "no_answer", None),
        ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", "correct", "\\frac{2}{4}"),
        ("#### 3", "\\boxed{3}", "correct", "3"),
        ("\\boxed{0.5}", "$\\frac{1}{2}$", "correct", "0.5"),
    ],
)
def test_score_one(response: str, gold: str, reason: str, extracted: str | None) -> None:
    expected_reward = 1.0 if reason == "correct" else 0.0
    assert score_one(response, gold) == MathVerdict(expected_reward, reason, extracted)
    assert verify_math(response, gold) == expected_reward


def test_expanded_square_matches_factored_form() -> None:
    # Observed with math-verify 0.9.0: sympy proves x^2+2x+1 == (x+1)^2 symbolically.
    assert score_one("\\boxed{x^2+2x+1}", "(x+1)^2") == MathVerdict(1.0, "correct", "x^2+2x+1")
    assert score_one("\\boxed{x^2+2x+2}", "(x+1)^2").reason == "wrong"


def test_latex_fraction_goes_through_math_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[object, object]] = []
    real_verify = math_env.verify

    def counting_verify(gold: object, target: object, **kwargs: object) -> bool:
        calls.append((gold, target))
        return real_verify(gold, target, **kwargs)

    monkeypatch.setattr(math_env, "verify", counting_verify)
    assert score_one("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}").reason == "correct"
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("response", "gold", "reason"),
    [
        ("\\boxed{1,000}", "1000", "correct"),
        ("#### +3.0", "3", "correct"),
        ("\\boxed{3/4}", "0.75", "correct"),
        ("\\boxed{50\\%}", "50", "correct"),
        ("\\boxed{-2}", "\u22122", "correct"),
        ("\\boxed{1{,}000}", "1,000", "correct"),
        ("The answer is 0.1000000000001.", "0.1", "correct"),
        ("\\boxed{12}", "13", "wrong"),
        ("\\boxed{0.1}", "0.2", "wrong"),
        ("\\boxed{1/3}", "1/4", "wrong"),
        ("\\boxed{\\text{Yes}}", "yes", "correct"),
        ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)", "correct"),
    ],
)
def test_fast_path_never_calls_math_verify(
    monkeypatch: pytest.MonkeyPatch, response: str, gold: str, reason: str
) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("math-verify must not be called on the fast path")

    monkeypatch.setattr(math_env, "verify", forbidden)
    monkeypatch.setattr(math_env, "parse", forbidden)
    assert score_one(response, gold).reason == reason


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("0.333333", "1/3"),  # math-verify rounds floats to 6 decimals and calls these equal
        ("0.5", "50%"),  # a percent on one side only is a convention question
        ("\\frac{1}{2}", "0.5"),
        ("\\Pi", "\\pi"),  # case is folded outside LaTeX commands only
    ],
)
def test_fast_path_defers_when_unsure(pred: str, gold: str) -> None:
    assert fast_path_reason(pred, gold) is None


def test_near_miss_decimal_is_judged_by_math_verify() -> None:
    assert score_one("\\boxed{0.333333}", "1/3").reason == "correct"
    assert score_one("\\boxed{0.3334}", "1/3").reason == "wrong"


HUGE = 200_000


@pytest.mark.parametrize(
    ("response", "gold", "reason"),
    [
        ("", "7", "no_answer"),
        ("}}}{{{", "7", "no_answer"),
        ("\\boxed{", "7", "no_answer"),
        ("\\boxed{" * HUGE, "7", "no_answer"),
        ("{" * HUGE + "\\boxed{7}", "7", "correct"),
        ("\\boxed{" + "9" * HUGE + "}", "9", "wrong"),
        ("\\boxed{" + "x+" * HUGE + "1}", "x+1", "wrong"),
        ("\\boxed{7}", "", "error"),
        ("\ud800\\boxed{\udfff}", "3", "wrong"),
        ("\\boxed{3}", "\ud800", "wrong"),
        ("\\boxed{\\frac{1}{}", "1", "no_answer"),
        ("\\boxed{\\frac{1}{}}", "1", "wrong"),
        ("\\boxed{$$}", "1", "wrong"),
        ("The answer is \\boxed", "1", "wrong"),
    ],
)
def test_hostile_inputs_never_raise(response: str, gold: str, reason: str) -> None:
    assert score_one(response, gold).reason == reason


@pytest.mark.parametrize(("response", "gold"), [(None, "1"), ("\\boxed{1}", None), (7, "7"), (b"\\boxed{1}", "1")])
def test_non_str_inputs_are_errors(response: object, gold: object) -> None:
    assert score_one(response, gold) == MathVerdict(0.0, "error", None)  # type: ignore[arg-type]


def test_reason_counts() -> None:
    verdicts = [MathVerdict(1.0, "correct"), MathVerdict(0.0, "wrong"), MathVerdict(1.0, "correct")]
    assert reason_counts(verdicts) == {"correct": 2, "wrong": 1, "no_answer": 0, "timeout": 0, "error": 0}


# -- pool ------------------------------------------------------------------------------------------------------------


def test_pool_times_out_a_stuck_item_and_recovers() -> None:
    responses = [
        f"\\boxed{{{STALL_ANSWER}}}",
        "\\boxed{\\frac{2}{4}}",
        "\\boxed{3}",
        "\\boxed{x^2+2x+1}",
        "no marker here",
        "\\boxed{y}",
    ]
    golds = ["1", "\\frac{1}{2}", "3", "(x+1)^2", "5", "x"]
    # One worker: the items after the stuck one can only be scored if the killed worker is really replaced.
    with MathVerifierPool(num_workers=1, timeout_s=1.0, _equivalence_fn=stall_or_crash_on_marker) as pool:
        verdicts = pool.score(responses, golds)
        expected_reasons = ["timeout", "correct", "correct", "correct", "no_answer", "wrong"]
        assert [verdict.reason for verdict in verdicts] == expected_reasons
        assert [verdict.reward for verdict in verdicts] == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
        assert pool.workers_replaced == 1

        again = pool.score(["\\boxed{\\sqrt{4}}", "#### 10"], ["2", "11"])
        assert [verdict.reason for verdict in again] == ["correct", "wrong"]
        assert pool.reason_totals == {"timeout": 1, "correct": 4, "no_answer": 1, "wrong": 2}


def test_pool_survives_a_crashing_worker() -> None:
    with MathVerifierPool(num_workers=2, timeout_s=5.0, _equivalence_fn=stall_or_crash_on_marker) as pool:
        verdicts = pool.score([f"\\boxed{{{CRASH_ANSWER}}}", "\\boxed{\\frac{6}{3}}"], ["1", "2"])
        assert [verdict.reason for verdict in verdicts] == ["error", "correct"]
        assert pool.workers_replaced == 1
        assert pool.score(["\\boxed{\\frac{6}{3}}"], ["3"])[0].reason == "wrong"


def test_interrupted_batch_does_not_leak_into_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    with MathVerifierPool(num_workers=1, timeout_s=30.0) as pool:
        pool.wait_until_ready()

        def interrupt() -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(pool, "_wait_for_events", interrupt)
        with pytest.raises(KeyboardInterrupt):
            pool.score(["\\boxed{\\frac{4}{2}}"], ["2"])  # the item is in flight when the interrupt hits
        monkeypatch.undo()
        assert pool.workers_replaced == 1
        assert pool.score(["\\boxed{\\frac{9}{3}}"], ["2"])[0].reason == "wrong"


def test_pool_handles_bad_items_and_arguments() -> None:
    with MathVerifierPool(num_workers=1) as pool:
        responses = [None, 5, "\\boxed{2}", "\\boxed{\\frac{4}{2}}", "\\boxed{\\frac{4}{2}}", "\\boxed{\ud800}"]
        verdicts = pool.score(responses, ["1", "1", "2", "2", "2", "3"])  # type: ignore[arg-type]
        assert [verdict.reason for verdict in verdicts] == ["error", "error", "correct", "correct", "correct", "wrong"]
        # "\\boxed{2}" took the fast path and the repeated pair was sent once: 2 distinct pairs reached math-verify.
        assert pool.math_verify_calls == 2
        assert pool.score([], []) == []
        with pytest.raises(ValueError, match="2 responses but 1 golds"):
            pool.score(["a", "b"], ["a"])
    with pytest.raises(RuntimeError, match="closed"):
        pool.score(["\\boxed{1}"], ["1"])
    with pytest.raises(ValueError, match="num_workers"):
        MathVerifierPool(num_workers=0)
    with pytest.raises(ValueError, match="timeout_s"):
        MathVerifierPool(timeout_s=0)


def test_score_math_batch() -> None:
    rewards, reasons = score_math_batch(
        ["\\boxed{\\frac{1}{2}}", "#### 4", "nothing", "The answer is 10."], ["0.5", "5", "1", "10"], num_workers=1
    )
    assert rewards == [1.0, 0.0, 0.0, 1.0]
    assert reasons == ["correct", "wrong", "no_answer", "correct"]
    assert set(reasons) <= set(REASONS)
