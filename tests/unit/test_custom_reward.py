"""verifier.custom: the loader and its errors, the pool (batches, a slow row, a raising row, bad returns), the
preflight's check (exit 2 before workers), TaskScorer routing, and the worked example in examples/rewards."""

import logging
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cipo_nemo.__main__ import main
from cipo_nemo.config import ConfigError, load_config
from cipo_nemo.data.sources import TaskItem
from cipo_nemo.environments.custom_reward import (
    CUSTOM_ERROR,
    CUSTOM_TIMEOUT,
    CustomRewardError,
    CustomRewardPool,
    load_reward_function,
)
from cipo_nemo.environments.scoring import TaskScorer
from cipo_nemo.preflight import run_preflight

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "conf" / "cipo_base.yaml"
EXAMPLES = REPO / "examples" / "rewards"
FAST = ["data.train.reasoning_gym.size=8", "verifier.num_workers=1"]

USER_MODULE = '''
import time

NOT_A_FUNCTION = 3


def by_length(items, responses):
    """reward = len(response); 'slow' hangs, 'boom' raises (both only when that row is in the call)."""
    rows = []
    for item, response in zip(items, responses):
        if response == "slow":
            time.sleep(60)
        if response == "boom":
            raise RuntimeError("boom on " + item.id)
        rows.append((float(len(response)), "by_length"))
    return rows


def one_pair_per_call(items, responses):
    return [(1.0, "one")]  # wrong length for a batch of several


def nan_reward(items, responses):
    return [(float("nan"), "nan") for _ in items]


class Scorer:
    @staticmethod
    def score(items, responses):
        return [(0.0, "static") for _ in items]
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user's reward module on PYTHONPATH (sys.path here; spawned workers inherit it)."""
    name = f"user_rewards_{tmp_path.name}"  # unique: load_reward_function caches by spec
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def _items(count: int, family: str = "math", answer: str = "4") -> list[TaskItem]:
    return [TaskItem(id=f"item{i}", family=family, prompt=f"problem {i}", messages=None, answer=answer,
                     origin=f"test:{i}", metadata={}) for i in range(count)]


# -- the loader ------------------------------------------------------------------------------------------------------


def test_loader_finds_functions_and_static_methods(user_module):
    assert load_reward_function(f"{user_module}:by_length")(_items(1), ["abc"]) == [(3.0, "by_length")]
    assert load_reward_function(f"{user_module}:Scorer.score")(_items(2), ["a", "b"]) == [(0.0, "static")] * 2


@pytest.mark.parametrize("spec, message", [
    ("no_colon_here", "is not 'package.module:function'"),
    ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
    ("{module}:missing", "has no 'missing'"),
    ("{module}:NOT_A_FUNCTION", "is a int, not a function"),
])
def test_loader_says_what_is_wrong(user_module, spec, message):
    with pytest.raises(CustomRewardError, match=message):
        load_reward_function(spec.format(module=user_module))


def test_a_module_that_fails_to_import_is_named(tmp_path, monkeypatch):
    (tmp_path / "broken_rewards_mod.py").write_text("raise ImportError('needs a package that is not here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(CustomRewardError, match="importing module 'broken_rewards_mod' failed: ImportError: needs"):
        load_reward_function("broken_rewards_mod:fn")


def test_config_rejects_a_spec_without_module_and_function():
    with pytest.raises(ConfigError, match="verifier.custom"):
        load_config(BASE, ["verifier.custom=just_a_name"])
    assert load_config(BASE, ["verifier.custom=pkg.mod:fn"]).verifier.custom == "pkg.mod:fn"


# -- the preflight ---------------------------------------------------------------------------------------------------


def test_dry_run_with_an_unimportable_function_exits_2_naming_the_key(capsys, tmp_path):
    code = main(["--config", str(BASE), "--dry-run", *FAST, f"run.output_dir={tmp_path / 'run'}",
                 "verifier.custom=no_such_reward_module:score"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("config error: verifier.custom: cannot import module 'no_such_reward_module'")
    assert not (tmp_path / "run").exists()


def test_dry_run_with_a_non_callable_exits_2(capsys, user_module):
    code = main(["--config", str(BASE), "--dry-run", *FAST, f"verifier.custom={user_module}:NOT_A_FUNCTION"])
    assert code == 2
    assert "config error: verifier.custom: " in capsys.readouterr().err


def test_preflight_with_a_custom_reward_skips_the_math_gold_check(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    report = run_preflight(load_config(BASE, [*FAST, "verifier.custom=length_penalty:reward"]))
    assert report.gold_check == {}  # the user's function reads the golds its own way
    assert report.data[0].loaded == 8


# -- the pool --------------------------------------------------------------------------------------------------------


def test_pool_scores_in_batches_and_loses_only_the_slow_and_the_raising_row(user_module, caplog):
    responses = ["a", "bb", "slow", "ccc", "boom", "dddd", "e"]
    with CustomRewardPool(f"{user_module}:by_length", num_workers=2, timeout_s=1.0, batch_size=3) as pool:
        pool.wait_until_ready()
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="cipo_nemo.environments.custom_reward"):
            rewards, reasons = pool.score(_items(len(responses)), responses)
        elapsed = time.monotonic() - started
        assert rewards == [1.0, 2.0, 0.0, 3.0, 0.0, 4.0, 1.0]
        assert reasons == ["by_length", "by_length", CUSTOM_TIMEOUT, "by_length", CUSTOM_ERROR, "by_length", "by_length"]
        assert elapsed < 30  # the sleeping call was killed at its 1 s deadline (twice: in its batch, then alone)
        assert pool.workers_replaced == 2
        assert "timeout on test:2" in caplog.text
        assert "RuntimeError: boom on item4" in caplog.text
        # the replaced workers serve the next batch
        assert pool.score(_items(2), ["xy", "z"]) == ([2.0, 1.0], ["by_length", "by_length"])


def test_bad_return_values_are_custom_errors_with_a_message(user_module, caplog):
    with caplog.at_level(logging.WARNING, logger="cipo_nemo.environments.custom_reward"):
        with CustomRewardPool(f"{user_module}:one_pair_per_call", num_workers=1, timeout_s=5.0, batch_size=2) as pool:
            # a call of 2 rows returns 1 pair: error; retried alone, each row gets its one pair
            assert pool.score(_items(2), ["a", "b"]) == ([1.0, 1.0], ["one", "one"])
        with CustomRewardPool(f"{user_module}:nan_reward", num_workers=1, timeout_s=5.0, batch_size=4) as pool:
            assert pool.score(_items(3), ["a", "b", "c"]) == ([0.0] * 3, [CUSTOM_ERROR] * 3)
    assert "reward nan is not a finite number" in caplog.text


# -- TaskScorer and the worked example -------------------------------------------------------------------------------


def test_example_length_penalty_in_process():
    sys.path.insert(0, str(EXAMPLES))
    try:
        from length_penalty import FREE_CHARS, PENALTY_PER_CHAR, reward
    finally:
        sys.path.remove(str(EXAMPLES))
    long_correct = "x" * (FREE_CHARS + 400) + " \\boxed{4}"
    rows = reward(_items(3), ["so \\boxed{4}", "\\boxed{5}", long_correct])
    assert rows[0] == (1.0, "correct")
    assert rows[1] == (0.0, "wrong")
    excess = len(long_correct) - FREE_CHARS
    assert rows[2] == (pytest.approx(1.0 - PENALTY_PER_CHAR * excess), "correct_too_long")


def test_task_scorer_routes_every_item_to_the_custom_function(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    verifier = load_config(BASE, ["verifier.num_workers=1", "verifier.custom=length_penalty:reward"]).verifier
    scorer = TaskScorer(verifier=verifier)
    try:
        code_item = _items(1, family="code", answer={"tests": []})[0]  # the example refuses code items: an error row
        scores = scorer.score([*_items(2), code_item], ["\\boxed{4}", "no answer", "print(1)"])
    finally:
        scorer.close()
    assert scores.rewards == [1.0, 0.0, 0.0]
    assert scores.reasons == ["correct", "no_answer", CUSTOM_ERROR]
