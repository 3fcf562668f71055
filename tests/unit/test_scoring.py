"""The task scorer routes math to the math verifier and code to the sandbox, keeping the input order."""

from pathlib import Path

import pytest

from cipo_nemo.config import load_config
from cipo_nemo.data.sources import TaskItem
from cipo_nemo.environments.scoring import TaskScorer

BASE = Path(__file__).resolve().parents[2] / "conf" / "cipo_base.yaml"


def _item(family, answer, item_id):
    return TaskItem(id=item_id, family=family, prompt="p", messages=None, answer=answer, origin=f"test:{item_id}",
                    metadata={})


@pytest.fixture(scope="module")
def scorer():
    scorer = TaskScorer(verifier=load_config(BASE, ["verifier.num_workers=1"]).verifier)
    yield scorer
    scorer.close()


def test_mixed_families_keep_their_order(scorer):
    add_tests = {"entry_point": "add", "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"}
    echo_tests = {"tests": [{"input": "4\n", "output": "8\n"}]}
    items = [_item("math", "7", "m1"), _item("code", add_tests, "c1"), _item("math", "7", "m2"),
             _item("code", echo_tests, "c2"), _item("code", add_tests, "c3")]
    responses = [
        "so \\boxed{7}",
        "```python\ndef add(a, b):\n    return a + b\n```",
        "The answer is 8.",
        "```python\nprint(int(input()) * 2)\n```",
        "```python\ndef add(a, b):\n    return a - b\n```",
    ]
    scores = scorer.score(items, responses)
    assert scores.rewards == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert scores.reasons == ["correct", "passed", "wrong", "passed", "failed"]


def test_code_prefix_from_the_answer_runs_with_the_program(scorer):
    tests = {"prompt": "import math\n", "entry_point": "root", "test": "def check(candidate):\n    assert candidate(9) == 3\n"}
    scores = scorer.score([_item("code", tests, "h1")], ["```python\ndef root(x):\n    return int(math.sqrt(x))\n```"])
    assert scores.reasons == ["passed"]


def test_code_item_without_tests_is_a_clear_error(scorer):
    with pytest.raises(ValueError, match="test:bad: a code item's answer must be an object"):
        scorer.score([_item("code", "42", "bad")], ["print(42)"])


def test_length_mismatch(scorer):
    with pytest.raises(ValueError, match="got 2 responses for 1 items"):
        scorer.score([_item("math", "1", "x")], ["a", "b"])
