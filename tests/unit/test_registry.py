"""Every named benchmark (cipo_nemo/eval/registry.py) on a few rows in its real hub schema, written here into a
Hugging Face cache layout and read offline through `datasets.load_dataset`: the problem the model reads, the gold
after the entry's normalization (AIME integers, MATH's boxed LaTeX, GSM8K's `#### N`, AMC numbers, OlympiadBench's
answer lists), and the verifier's verdict on a right and a wrong answer; the code benchmarks graded in the real
sandbox by their reference harness's rule (HumanEval: prompt + completion; MBPP: program + test_setup_code +
test_list)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cipo_nemo.environments.code import CodeTask, score_code
from cipo_nemo.environments.math import score_one
from cipo_nemo.environments.scoring import code_task_of
from cipo_nemo.eval.__main__ import main
from cipo_nemo.eval.benchmarks import load_benchmark
from cipo_nemo.eval.registry import (
    REGISTRY,
    UnusableGold,
    aime_integer,
    gsm8k_final,
    latex_answer,
    latex_answer_list,
    mbpp_entry_point,
    plain_number,
)
from tests.hub_layout import put_in_cache, write_dataset_repo

COMMIT = "e" * 40

# ---------------------------------------------------------------------------------------------- rows, real schemas

HUMANEVAL_PROMPT = (
    "from typing import List\n\n\ndef below_zero(operations: List[int]) -> bool:\n"
    '    """ Given deposits and withdrawals, return True if the balance falls below zero at some point.\n'
    "    >>> below_zero([1, 2, -4])\n    True\n    \"\"\"\n")
HUMANEVAL_TEST = ("\n\nMETADATA = {'author': 'test', 'dataset': 'test'}\n\n\ndef check(candidate):\n"
                  "    assert candidate([]) == False\n    assert candidate([1, 2, -3, 1]) == False\n"
                  "    assert candidate([1, 2, -4, 5]) == True\n")
MBPP_TESTS = ['assert drop_char("hello","l") == "heo"', 'assert drop_char("abcda","a") == "bcd"',
              'assert drop_char("PHP","P") == "H"']

ROWS = {  # name -> {config: {split: rows}}, the columns each hub dataset has
    "math500": {"default": {"test": [
        {"problem": "Convert the point $(0,3)$ in rectangular coordinates to polar coordinates.",
         "solution": "We have $r = 3$ and $\\theta = \\frac{\\pi}{2}$, so $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$.",
         "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "subject": "Precalculus", "level": 2,
         "unique_id": "test/precalculus/807.json"},
        {"problem": "What is $\\frac{1}{2} + \\frac{1}{3}$?", "solution": "$\\boxed{\\frac{5}{6}}$",
         "answer": "\\frac{5}{6}", "subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/1.json"},
    ]}},
    "aime24": {"default": {"train": [
        {"id": 60, "problem": "Find the number of ... (answer 33).", "solution": "... so the answer is $\\boxed{033}$.",
         "answer": "033", "url": "https://artofproblemsolving.com/wiki/2024_AIME_I_Problems/Problem_1", "year": "2024"},
        {"id": 61, "problem": "Find the remainder ... (answer 204).", "solution": "$\\boxed{204}$", "answer": "204",
         "url": "https://artofproblemsolving.com/wiki/2024_AIME_I_Problems/Problem_2", "year": "2024"},
    ]}},
    "aime25": {"default": {"test": [
        {"problem": "Find the sum of all integer bases $b>9$ ... (answer 70).", "answer": "70", "id": "0"},
        {"problem": "A problem whose answer is 16.", "answer": "16", "id": "1"},
    ]}},
    "amc23": {"default": {"test": [
        {"id": 0, "question": "How many miles from City A will they be when they meet? (27)", "answer": 27.0,
         "url": "https://artofproblemsolving.com/wiki/2023_AMC_12A_Problems/Problem_1"},
        {"id": 1, "question": "What is the probability ... as a decimal? (0.5)", "answer": 0.5,
         "url": "https://artofproblemsolving.com/wiki/2023_AMC_12A_Problems/Problem_2"},
    ]}},
    "gsm8k": {name: {"train": [{"question": "Train question?", "answer": "1 + 1 = 2\n#### 2"}], "test": [
        {"question": "Janet's ducks lay 16 eggs per day. ... How much does she make every day?",
         "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18"},
        {"question": "A shop sells 1,000 pens a day; how many in 2 days?",
         "answer": "2 * 1,000 = 2,000 pens.\n#### 2,000"},
    ]} for name in ("main", "socratic")},
    "minerva": {"default": {"test": [
        {"question": "Compute the ratio of the two fluxes.", "answer": "\\frac{1}{4}"},
        {"question": "What is the wavelength in meters?", "answer": "7.5e-7"},
    ]}},
    "olympiadbench": {"default": {"test": [
        {"id": 1606, "question": "Compute the smallest positive integer $n$ such that ...",
         "solution": ["Note that ... the answer is $n=3$."], "final_answer": ["$3$"], "context": None,
         "modality": "Text-only", "difficulty": "Competition", "is_multiple_answer": False, "unit": None,
         "answer_type": "Numerical", "question_type": "Open-ended", "subfield": "Number Theory", "subject": "Math",
         "language": "English"},
        {"id": 1607, "question": "Find all pairs ... (two answers)", "solution": ["..."],
         "final_answer": ["$\\frac{1}{2}$", "$2$"], "context": None, "modality": "Text-only",
         "difficulty": "Competition", "is_multiple_answer": True, "unit": None, "answer_type": "Numerical",
         "question_type": "Open-ended", "subfield": "Algebra", "subject": "Math", "language": "English"},
    ]}},
    "openai_humaneval": {"default": {"test": [
        {"task_id": "HumanEval/3", "prompt": HUMANEVAL_PROMPT,
         "canonical_solution": "    balance = 0\n    for op in operations:\n        balance += op\n"
                               "        if balance < 0:\n            return True\n    return False\n",
         "test": HUMANEVAL_TEST, "entry_point": "below_zero"},
    ]}},
    "mbpp": {name: {"test": [
        {"task_id": 11, "text": "Write a python function to remove every occurrence of a given character from a string.",
         "code": "def drop_char(s, ch):\r\n    return s.replace(ch, '')", "test_list": MBPP_TESTS,
         "test_setup_code": "", "challenge_test_list": []},
        {"task_id": 12, "text": "Write a function that returns a sorted copy of a list.",
         "code": "import math\ndef helper(x):\n    return x\ndef sort_copy(items):\n    return sorted(items)",
         "test_list": ["assert sort_copy([3, 1, 2]) == [1, 2, 3]"], "test_setup_code": "FIXTURE = [3, 1, 2]",
         "challenge_test_list": []},
    ]} for name in ("full", "sanitized_like")},
}

# name -> (golds after normalization, in row order)
GOLDS = {
    "math500": ["\\left( 3, \\frac{\\pi}{2} \\right)", "\\frac{5}{6}"],
    "aime24": ["33", "204"],
    "aime25": ["70", "16"],
    "amc23": ["27", "0.5"],
    "gsm8k": ["18", "2000"],
    "minerva": ["\\frac{1}{4}", "7.5e-7"],
    "olympiadbench": ["3", "\\frac{1}{2}, 2"],
}
# name -> (a right response, a wrong one) for the first problem
RESPONSES = {
    "math500": ("So the point is $\\boxed{\\left(3, \\frac{\\pi}{2}\\right)}$.", "\\boxed{(3, \\pi)}"),
    "aime24": ("The answer is $\\boxed{33}$.", "\\boxed{330}"),
    "aime25": ("\\boxed{70}", "\\boxed{7}"),
    "amc23": ("They meet after \\boxed{27} miles.", "\\boxed{27.5}"),
    "gsm8k": ("She makes 9 * 2 = 18 dollars.\n#### 18", "#### 16"),
    "minerva": ("\\boxed{0.25}", "\\boxed{4}"),
    "olympiadbench": ("\\boxed{3}", "\\boxed{4}"),
}


def cache_benchmark(cache: Path, tmp_path: Path, name: str) -> None:
    entry = REGISTRY[name]
    repo = write_dataset_repo(tmp_path / "repos" / name, ROWS[name])
    put_in_cache(cache, entry.hub_id, COMMIT, repo, repo_type="dataset")


def test_every_entry_has_rows_here():
    assert sorted(ROWS) == sorted(REGISTRY) and sorted(GOLDS) == sorted(n for n, e in REGISTRY.items()
                                                                        if e.verifier == "math")


# ---------------------------------------------------------------------------------------------- math entries


@pytest.mark.parametrize("name", sorted(GOLDS))
def test_math_entry_reads_its_schema_normalizes_the_gold_and_the_verifier_agrees(name, offline_hub, tmp_path):
    cache_benchmark(offline_hub, tmp_path, name)
    benchmark = load_benchmark(name)
    entry = REGISTRY[name]
    split_rows = ROWS[name][entry.config or "default"][entry.split]
    assert benchmark.name == name and benchmark.kind == "answer" and not benchmark.skipped
    assert [item.prompt for item in benchmark.items] == [row[entry.prompt] for row in split_rows]
    assert [item.answer for item in benchmark.items] == GOLDS[name]
    assert all(item.family == "math" and item.metadata == {"benchmark": name} for item in benchmark.items)
    if entry.id is not None:
        assert benchmark.items[0].id == f"{name}:{split_rows[0][entry.id]}"
    right, wrong = RESPONSES[name]
    assert score_one(right, benchmark.items[0].answer).reason == "correct"
    assert score_one(wrong, benchmark.items[0].answer).reason == "wrong"


def test_normalizations_of_the_gold_columns():
    assert latex_answer("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"  # MATH's boxed LaTeX
    assert latex_answer("$\\sqrt{2}$") == "\\sqrt{2}"
    assert aime_integer("033") == aime_integer(33) == aime_integer(33.0) == "33"
    assert gsm8k_final("3 + 4 = 7 apples.\n#### 1,234") == "1234"
    assert plain_number(27.0) == "27" and plain_number(0.25) == "0.25" and plain_number("\\frac{3}{4}") == "\\frac{3}{4}"
    assert latex_answer_list(["$x=1$", "$\\boxed{2}$"]) == "x=1, 2"
    for normalize, bad in [(aime_integer, "12.5"), (aime_integer, "1000"), (aime_integer, "x"), (gsm8k_final, "7"),
                           (gsm8k_final, "#### seven"), (latex_answer, ""), (latex_answer_list, []),
                           (plain_number, True)]:
        with pytest.raises(UnusableGold):
            normalize(bad)


def test_a_row_the_normalization_cannot_read_is_skipped_and_counted(offline_hub, tmp_path):
    entry = REGISTRY["aime25"]
    rows = [{"problem": "ok", "answer": "70", "id": "0"}, {"problem": "bad gold", "answer": "seventy", "id": "1"},
            {"problem": "  ", "answer": "5", "id": "2"}]
    put_in_cache(offline_hub, entry.hub_id, COMMIT, write_dataset_repo(tmp_path / "r", {"default": {"test": rows}}),
                 repo_type="dataset")
    benchmark = load_benchmark("aime25")
    assert [item.answer for item in benchmark.items] == ["70"]
    assert benchmark.skipped == {"bad_answer": 1, "bad_row": 1}


# ---------------------------------------------------------------------------------------------- code entries


def score(item, response: str):
    return score_code(response, code_task_of(item), timeout_s=10)


def test_openai_humaneval_runs_prompt_plus_completion(offline_hub, tmp_path):
    cache_benchmark(offline_hub, tmp_path, "openai_humaneval")
    (item,) = load_benchmark("openai_humaneval").items
    assert item.id == "openai_humaneval:HumanEval/3" and item.prompt == HUMANEVAL_PROMPT
    # a chat model repeats the function and uses List without importing it: the prompt's import is in the program
    whole = ("```python\ndef below_zero(operations: List[int]) -> bool:\n    total = 0\n    for op in operations:\n"
             "        total += op\n        if total < 0:\n            return True\n    return False\n```")
    assert score(item, whole).outcome == "passed"
    body_only = "    return any(sum(operations[:i + 1]) < 0 for i in range(len(operations)))\n"  # a continuation
    assert score(item, body_only).outcome == "passed"
    assert score(item, whole.replace("< 0", "<= 0")).outcome == "failed"
    # the completion alone (no prompt) is what crashed before: the rule is what makes it pass
    alone = CodeTask(task_id="alone", kind="humaneval", prompt="", entry_point="below_zero", test=HUMANEVAL_TEST)
    verdict = score_code(whole, alone, timeout_s=10)
    assert verdict.outcome == "crashed" and "NameError" in verdict.detail and "List" in verdict.detail


def test_mbpp_runs_the_program_then_setup_then_the_test_list(offline_hub, tmp_path):
    cache_benchmark(offline_hub, tmp_path, "mbpp")
    first, second = load_benchmark("mbpp").items
    assert first.id == "mbpp:11" and first.prompt == (
        "Write a python function to remove every occurrence of a given character from a string.\n"
        "Your code should pass these tests:\n\n" + "\n".join(MBPP_TESTS))
    assert first.answer["entry_point"] == "drop_char" and second.answer["entry_point"] == "sort_copy"
    assert score(first, "```python\ndef drop_char(s, ch):\n    return s.replace(ch, '')\n```").outcome == "passed"
    wrong = score(first, "```python\ndef drop_char(s, ch):\n    return s.replace(ch, '', 1)\n```")
    assert wrong.outcome == "failed" and 'assert drop_char("hello","l") == "heo"' in wrong.detail
    renamed = score(first, "```python\ndef remove_char(s, ch):\n    return s.replace(ch, '')\n```")
    assert renamed.outcome == "crashed" and "drop_char" in renamed.detail
    # test_setup_code runs after the program and before the asserts: the program's top level cannot see it yet,
    # the function the asserts call can
    assert score(second, "SEEN = FIXTURE\ndef sort_copy(items):\n    return sorted(items)").outcome == "crashed"
    assert score(second, "def sort_copy(items):\n    assert FIXTURE == [3, 1, 2]\n    return sorted(items)"
                 ).outcome == "passed"


def test_mbpp_entry_point_is_the_function_the_tests_call():
    assert mbpp_entry_point("def helper(x): return x\ndef f(a): return helper(a)", ["assert f(1) == 1"]) == "f"
    assert mbpp_entry_point("not python (", ["assert set(g([1])) == {1}"]) == "set"  # no parse: first call
    with pytest.raises(ValueError, match="cannot tell which function"):
        mbpp_entry_point("", ["x = 1"])


# ---------------------------------------------------------------------------------------------- the command line


def test_an_absent_benchmark_offline_is_one_line_naming_the_id_and_the_cache(offline_hub, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    code = main(["--model", str(model), "--benchmarks", "math500", "--n", "1", "--k", "1",
                 "--output-dir", str(tmp_path / "out")])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: benchmark math500: dataset 'HuggingFaceH4/MATH-500' is not in the Hugging Face cache {offline_hub} and "
        "HF_HUB_OFFLINE=1 forbids downloading it: download it into that cache first "
        "(hf download HuggingFaceH4/MATH-500 --repo-type dataset)")


def test_list_names_every_entry(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--list"])
    assert done.value.code == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == list(REGISTRY)
    assert any("HuggingFaceH4/MATH-500 (config -, split test, revision main)" in line for line in out)
