"""The evaluation harness without a model: aggregation against hand-computed numbers, the table, the JSON and the
PNG, benchmark loading (formats, built-ins, bad rows), and the CLI's one-line errors."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from cipo_nemo.config.schema import VerifierConfig
from cipo_nemo.environments.scoring import TaskScorer
from cipo_nemo.eval.__main__ import main
from cipo_nemo.eval.benchmarks import (
    DEFAULT_REASONING_GYM_SEED,
    DEFAULT_REASONING_GYM_SIZE,
    Benchmark,
    BenchmarkError,
    load_benchmark,
    load_benchmarks,
    parse_benchmark_list,
)
from cipo_nemo.eval.harness import (
    EvalError,
    benchmark_seed,
    check_k_list,
    judge_given_solutions,
    resolve_eval_model,
    run_config_of,
)
from cipo_nemo.eval.report import (
    build_pass_at_k_figure,
    format_table,
    summarize,
    summarize_correction,
    write_results,
)

# ---------------------------------------------------------------------------------------------- aggregation

# Three problems, n = 4, with c = 1, 2, 0 correct samples.
REWARDS = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]


def test_summarize_matches_hand_computed_pass_at_k():
    summary = summarize(REWARDS, n=4, k_list=[1, 2, 4])
    assert summary["problems"] == 3 and summary["n"] == 4 and summary["samples"] == 12
    assert summary["avg"] == pytest.approx(3 / 12)
    # pass@1 = mean c/n = (1/4 + 2/4 + 0) / 3
    assert summary["pass@k"]["1"] == pytest.approx(0.25)
    # pass@2: 1 - C(3,2)/C(4,2) = 1/2; 1 - C(2,2)/C(4,2) = 5/6; 0
    assert summary["pass@k"]["2"] == pytest.approx((0.5 + 5 / 6 + 0.0) / 3)
    # pass@4 = k = n: 1 when any sample is correct
    assert summary["pass@k"]["4"] == pytest.approx(2 / 3)


def test_summarize_all_correct_none_correct_and_partial_rewards():
    assert summarize([[1.0, 1.0, 1.0]], n=3, k_list=[1, 3])["pass@k"] == {"1": 1.0, "3": 1.0}  # c = n
    assert summarize([[0.0, 0.0, 0.0]], n=3, k_list=[1, 3])["pass@k"] == {"1": 0.0, "3": 0.0}  # c = 0
    # avg@n averages the rewards themselves; pass@k counts only rewards > 0.5 (the trainer's success rule)
    partial = summarize([[0.5, 1.0]], n=2, k_list=[1, 2])
    assert partial["avg"] == pytest.approx(0.75)
    assert partial["pass@k"] == {"1": pytest.approx(0.5), "2": pytest.approx(1.0)}


def test_summarize_of_no_problem_measures_nothing():
    assert summarize([], n=4, k_list=[1, 4]) == {"problems": 0, "n": 4, "samples": 0, "avg": None,
                                                 "pass@k": {"1": None, "4": None}}


def test_summarize_rejects_k_above_n_and_ragged_problems():
    with pytest.raises(ValueError, match="k=8 is larger than the number of samples n=4"):
        summarize(REWARDS, n=4, k_list=[1, 8])
    with pytest.raises(ValueError, match=r"n=4 rewards; got problems with \[3\]"):
        summarize([[1.0, 0.0, 0.0]], n=4, k_list=[1])


def test_summarize_correction_splits_flawed_and_correct_given_solutions():
    # given solutions: problem 0 correct, 1 flawed, 2 flawed
    metrics = summarize_correction(REWARDS, [True, False, False], n=4, k_list=[1, 2])
    assert metrics["all"] == summarize(REWARDS, n=4, k_list=[1, 2])
    success, retention = metrics["correction_success"], metrics["retention"]
    assert (success["problems"], retention["problems"]) == (2, 1)
    assert success["avg"] == pytest.approx(2 / 8)  # wrong -> right: 2 of the 8 corrections of flawed solutions
    assert success["pass@k"]["2"] == pytest.approx((5 / 6 + 0.0) / 2)
    assert retention["avg"] == pytest.approx(1 / 4)  # right -> right: 1 of 4
    assert retention["pass@k"]["2"] == pytest.approx(0.5)
    no_correct = summarize_correction(REWARDS, [False, False, False], n=4, k_list=[1])
    assert no_correct["retention"]["avg"] is None and no_correct["retention"]["problems"] == 0


# ---------------------------------------------------------------------------------------------- outputs


def results_fixture() -> dict:
    return {
        "n": 4, "k": [1, 2, 4],
        "benchmarks": {
            "arith": {"kind": "answer", "metrics": summarize(REWARDS, n=4, k_list=[1, 2, 4])},
            "fix": {"kind": "correction",
                    "metrics": summarize_correction(REWARDS, [False, False, False], n=4, k_list=[1, 2, 4])},
        },
    }


def test_table_has_one_line_per_answer_benchmark_and_four_per_correction_benchmark():
    assert format_table(results_fixture()).splitlines() == [
        "benchmark           problems  n  avg@4  pass@1  pass@2  pass@4",
        "--------------------------------------------------------------",
        "arith                      3  4  0.250   0.250   0.444   0.667",
        "fix [all]                  3  4  0.250   0.250   0.444   0.667",
        "fix [wrong->right]         3  4  0.250   0.250   0.444   0.667",
        "fix [right->right]         0  4      -       -       -       -",
        "fix [balanced]             3  4      -       -       -       -",  # no right->right: no balanced mean
    ]


def test_balanced_is_the_mean_of_wrong_to_right_and_right_to_right():
    # given solutions: problem 0 correct (retention 1/4), problems 1 and 2 flawed (wrong->right 2/8)
    metrics = summarize_correction(REWARDS, [True, False, False], n=4, k_list=[1, 2])
    balanced = metrics["balanced"]
    assert balanced["avg"] == pytest.approx((2 / 8 + 1 / 4) / 2)
    # pass@2: wrong->right (5/6 + 0) / 2, right->right 1 - C(3,2)/C(4,2) = 1/2
    assert balanced["pass@k"]["2"] == pytest.approx(((5 / 6 + 0.0) / 2 + 0.5) / 2)
    assert balanced["problems"] == 3


def test_two_answer_benchmarks_get_an_average_row_below_a_rule():
    from cipo_nemo.eval.report import answer_average

    easy = [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]]  # avg 0.75, pass@1 0.75
    results = {"n": 4, "k": [1, 4], "benchmarks": {
        "hard": {"kind": "answer", "metrics": summarize(REWARDS, n=4, k_list=[1, 4])},
        "easy": {"kind": "answer", "metrics": summarize(easy, n=4, k_list=[1, 4])},
        "fix": {"kind": "correction", "metrics": summarize_correction(REWARDS, [True, False, False], n=4,
                                                                       k_list=[1, 4])},
    }}
    results["average"] = answer_average(results)
    # each benchmark counts once, whatever its size: (3/12 + 6/8) / 2; the correction benchmark is not averaged
    assert results["average"]["avg"] == pytest.approx((3 / 12 + 6 / 8) / 2)
    assert results["average"]["pass@k"]["4"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert results["average"]["benchmarks"] == 2 and results["average"]["problems"] == 5
    lines = format_table(results).splitlines()
    assert lines[-2] == "-" * len(lines[0]) and lines[-1].split() == ["average", "5", "4", "0.500", "0.500", "0.833"]
    one = {"n": 4, "k": [1], "benchmarks": {"hard": results["benchmarks"]["hard"]}}
    assert answer_average(one) is None  # one benchmark: no average row


def test_plot_has_a_log2_pass_at_k_curve_per_measured_row():
    figure = build_pass_at_k_figure(results_fixture())
    axis = figure.axes[0]
    assert axis.get_xscale() == "log"
    assert axis.xaxis.get_transform().base == 2
    lines = {line.get_label(): line for line in axis.get_lines()}
    # the empty right->right subset draws no line
    assert sorted(lines) == ["arith (3 problems)", "fix [all] (3 problems)", "fix [wrong->right] (3 problems)"]
    assert list(lines["arith (3 problems)"].get_xdata()) == [1, 2, 4]
    assert list(lines["arith (3 problems)"].get_ydata()) == pytest.approx([0.25, (0.5 + 5 / 6) / 3, 2 / 3])


def test_write_results_round_trips_json_and_samples_and_writes_a_png(tmp_path):
    results = results_fixture()
    samples = [{"benchmark": "arith", "id": "a", "responses": ["#### 1", "é"], "rewards": [1.0, 0.0]}]
    paths = write_results(results, samples, tmp_path / "out")
    assert json.loads(paths["results"].read_text()) == results
    assert [json.loads(line) for line in paths["samples"].read_text().splitlines()] == samples
    png = paths["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (704, 462)  # 6.4 x 4.2 inches at 110 dpi


# ---------------------------------------------------------------------------------------------- k, model, seeds


def test_check_k_list_sorts_and_rejects_k_above_n():
    assert check_k_list([4, 1, 2, 2], n=4) == [1, 2, 4]
    with pytest.raises(EvalError, match="k=8 is larger than n=4"):
        check_k_list([1, 8], n=4)
    with pytest.raises(EvalError, match="k must be an integer >= 1"):
        check_k_list([0], n=4)


def test_model_resolution_of_run_directories_and_checkpoints(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_2").mkdir(parents=True)
    (run / "config.yaml").write_text("run: {}\n")
    (run / "checkpoints" / "step_2" / "config.yaml").write_text("run: {}\n")
    with pytest.raises(EvalError, match="has no hf_model/"):
        resolve_eval_model(run)
    # a checkpoint is exported (tests/functional/test_export.py); one whose save did not finish is an error
    with pytest.raises(EvalError, match="step_2 is an incomplete checkpoint"):
        resolve_eval_model(run / "checkpoints" / "step_2")
    (run / "checkpoints" / "step_2" / "COMPLETE").write_text("2\n")
    with pytest.raises(EvalError, match="step_2 is a checkpoint without policy"):
        resolve_eval_model(run / "checkpoints" / "step_2")
    assert run_config_of(run / "checkpoints" / "step_2") == run / "checkpoints" / "step_2" / "config.yaml"
    (run / "hf_model").mkdir()
    (run / "hf_model" / "config.json").write_text("{}")
    assert resolve_eval_model(run) == (run / "hf_model").resolve()
    with pytest.raises(EvalError, match="--model: directory .*missing does not exist"):
        resolve_eval_model(tmp_path / "missing")


def test_benchmark_seeds_differ_by_benchmark_and_stream_and_are_stable():
    assert benchmark_seed(0, "a", 0) == benchmark_seed(0, "a", 0)
    assert len({benchmark_seed(0, "a", 0), benchmark_seed(0, "b", 0), benchmark_seed(0, "a", 1),
                benchmark_seed(1, "a", 0)}) == 4


# ---------------------------------------------------------------------------------------------- benchmark files


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_math_file_reads_like_a_training_file_and_skips_bad_rows(tmp_path, caplog):
    path = write_lines(tmp_path / "arith.jsonl", [
        {"prompt": "What is 1 + 1?", "answer": "2"},
        "{broken",
        {"prompt": "What is 2 + 2?"},
        {"prompt": "What is 3 + 3?", "answer": 6},
    ])
    with caplog.at_level(logging.WARNING):
        benchmark = load_benchmark(str(path))
    assert (benchmark.name, benchmark.kind) == ("arith", "answer")
    assert [(item.prompt, item.answer, item.family) for item in benchmark.items] == [
        ("What is 1 + 1?", "2", "math"), ("What is 3 + 3?", "6", "math")]
    assert benchmark.skipped == {"not_json": 1, "missing_field:answer": 1}
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert f"{path}:2: skipped (not_json)" in messages and f"{path}:3: skipped (missing_field:answer)" in messages


def test_code_file_holds_humaneval_and_stdio_tasks(tmp_path, caplog):
    path = write_lines(tmp_path / "code.jsonl", [
        {"task_id": "add", "prompt": "def add(a, b):\n", "entry_point": "add",
         "test": "def check(f):\n    assert f(1, 2) == 3\n"},
        {"task_id": "echo", "prompt": "Print the input.", "tests": [{"input": "x\n", "output": "x"}]},
        {"task_id": "broken", "prompt": "p", "entry_point": "f"},  # no test
        {"task_id": "quiet", "tests": [{"input": "", "output": "1"}]},  # nothing for the model to read
        {"task_id": "add", "prompt": "again", "entry_point": "add", "test": "def check(f): pass"},
    ])
    with caplog.at_level(logging.WARNING):
        benchmark = load_benchmark(str(path))
    assert benchmark.kind == "answer"
    assert [item.id for item in benchmark.items] == ["add", "echo"]
    assert benchmark.items[0].answer == {"kind": "humaneval", "prompt": "def add(a, b):\n", "entry_point": "add",
                                         "test": "def check(f):\n    assert f(1, 2) == 3\n"}
    assert benchmark.items[1].answer == {"kind": "stdio", "tests": [{"input": "x\n", "output": "x"}]}
    assert benchmark.items[1].prompt == "Print the input." and benchmark.items[1].family == "code"
    assert benchmark.skipped == {"bad_code_task": 1, "bad_prompt": 1, "duplicate_id": 1}
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert f"{path}:3: skipped (bad_code_task): task 'broken': a humaneval task needs entry_point and test" in messages


def test_correction_file_keeps_labels_and_infers_the_family(tmp_path, caplog):
    tests = {"entry_point": "add", "test": "def check(f):\n    assert f(1, 2) == 3\n"}
    path = write_lines(tmp_path / "fix.jsonl", [
        {"prompt": "What is 2 + 3?", "solution": "#### 6", "answer": "5", "solution_correct": False},
        {"id": "c1", "prompt": "Write add(a, b).", "solution": "def add(a, b): return a - b", "answer": tests},
        {"prompt": "What is 1 + 1?", "solution": "#### 2", "answer": 2, "solution_correct": "yes"},
        {"prompt": "What is 1 + 1?", "answer": "2"},  # no solution: not a correction row
        {"prompt": "Write add.", "solution": "x", "answer": {"entry_point": "add"}},  # tests missing
    ])
    with caplog.at_level(logging.WARNING):
        benchmark = load_benchmark(str(path))
    assert benchmark.kind == "correction"
    assert [(item.id, item.family) for item in benchmark.items] == [(f"{path}:1", "math"), ("c1", "code")]
    assert benchmark.attempts == ["#### 6", "def add(a, b): return a - b"]
    assert benchmark.attempt_correct == [False, None]
    assert benchmark.items[1].answer == tests
    assert benchmark.skipped == {"bad_solution_correct": 1, "bad_solution": 1, "bad_answer": 1}
    assert f"{path}:4: skipped (bad_solution)" in " ".join(record.getMessage() for record in caplog.records)
    head = benchmark.head(1)
    assert (len(head.items), head.attempts, head.attempt_correct) == (1, ["#### 6"], [False])


def test_a_file_without_usable_rows_is_an_error(tmp_path):
    path = write_lines(tmp_path / "fix.jsonl", [{"prompt": "p", "solution": "", "answer": "1"}])
    with pytest.raises(BenchmarkError, match=r"fix.jsonl: no usable row .*bad_solution=1"):
        load_benchmark(str(path))


def test_builtin_benchmarks():
    humaneval = load_benchmark("humaneval")
    assert len(humaneval.items) == 164 and humaneval.kind == "answer"
    first = humaneval.items[0]
    assert first.id == "HumanEval/0" and first.family == "code"
    assert first.prompt.startswith("from typing import List") and first.answer["entry_point"] == "has_close_elements"
    assert first.answer["prompt"] == first.prompt  # the prompt is also the code prefix the tests run after
    gym = load_benchmark("reasoning_gym:basic_arithmetic:5:7")
    assert gym.name == "reasoning_gym:basic_arithmetic" and len(gym.items) == 5
    assert [item.id for item in gym.items] == [f"basic_arithmetic:7:{i}" for i in range(5)]
    default = load_benchmark("reasoning_gym:basic_arithmetic")
    assert len(default.items) == DEFAULT_REASONING_GYM_SIZE
    assert default.items[0].id == f"basic_arithmetic:{DEFAULT_REASONING_GYM_SEED}:0"


def test_benchmark_spec_errors(tmp_path):
    with pytest.raises(BenchmarkError, match="unknown benchmark 'humanevil'"):
        load_benchmark("humanevil")
    with pytest.raises(BenchmarkError, match="size must be an integer >= 1, got '0'"):
        load_benchmark("reasoning_gym:basic_arithmetic:0")
    with pytest.raises(BenchmarkError, match=r"suffix '\.csv'"):
        load_benchmark(str(write_lines(tmp_path / "a.csv", [{"prompt": "p", "answer": "1"}])))
    one = write_lines(tmp_path / "a.jsonl", [{"prompt": "p", "answer": "1"}])
    (tmp_path / "sub").mkdir()
    two = write_lines(tmp_path / "sub" / "a.jsonl", [{"prompt": "p", "answer": "1"}])
    with pytest.raises(BenchmarkError, match="name\\(s\\) a given twice"):
        load_benchmarks([str(one), str(two)])
    assert parse_benchmark_list(" humaneval, a.jsonl ,") == ["humaneval", "a.jsonl"]
    assert isinstance(load_benchmarks([str(one)])[0], Benchmark)


# ---------------------------------------------------------------------------------------------- CLI errors


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--model", "/no/such/model", "--benchmarks", "humaneval", "--n", "2", "--k", "1"],
         "error: --model: directory /no/such/model does not exist"),
        (["--model", "{model}", "--benchmarks", "humanevil", "--n", "2", "--k", "1"],
         "error: unknown benchmark 'humanevil': not a named benchmark (math500, aime24, aime25, amc23, gsm8k, "
         "minerva, olympiadbench, openai_humaneval, mbpp), not 'humaneval', "
         "not reasoning_gym:<name>[:size[:seed[:options]]], not an existing file"),
        (["--model", "{model}", "--benchmarks", "humaneval", "--n", "4", "--k", "1,8"],
         "error: k=8 is larger than n=4 samples per problem; pass@k needs k <= n"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, arguments, message):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # resolvable; no test here gets as far as loading it
    argv = [argument.replace("{model}", str(model)) for argument in arguments]
    assert main([*argv, "--output-dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [message]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- the documented examples

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "benchmarks.md"


def documented_examples() -> list[list[str]]:
    """The JSON lines of each ```json block of docs/benchmarks.md, in order: math, code, correction, and rows of the
    worked correction example."""
    blocks = re.findall(r"^```json\n(.*?)^```$", DOCS.read_text(), flags=re.DOTALL | re.MULTILINE)
    return [block.strip().splitlines() for block in blocks]


def test_documented_examples_load_and_given_solutions_are_judged_by_the_verifiers(tmp_path):
    math_lines, code_lines, correction_lines, worked_lines = documented_examples()
    example = REPO / "examples" / "correction" / "critic_debug_sample.jsonl"
    example_rows = [json.loads(line) for line in example.read_text().splitlines()]
    assert all(json.loads(line) in example_rows for line in worked_lines)  # the docs quote the example file
    files = {name: write_lines(tmp_path / f"{name}.jsonl", lines)
             for name, lines in (("math", math_lines), ("code", code_lines), ("fix", correction_lines))}
    assert [item.answer for item in load_benchmark(str(files["math"])).items] == ["2"]
    code = load_benchmark(str(files["code"]))
    assert [(item.id, item.answer["kind"]) for item in code.items] == [("add", "humaneval"), ("sum-line", "stdio")]
    fix = load_benchmark(str(files["fix"]))
    assert [item.family for item in fix.items] == ["math", "code"] and fix.attempt_correct == [False, None]
    scorer = TaskScorer(verifier=VerifierConfig(num_workers=1, timeout_s=10.0, custom=None, custom_batch_size=8))
    try:
        judged = judge_given_solutions(fix, scorer)
        # a correct program for each code task passes its tests
        programs = ["def add(a, b):\n    return a + b\n", "print(sum(map(int, input().split())))"]
        right = scorer.score(code.items, programs)
    finally:
        scorer.close()
    assert judged == [{"solution_correct": False, "solution_judged_by": "label"},
                      {"solution_correct": False, "solution_judged_by": "verifier", "solution_reason": "failed"}]
    assert right.rewards == [1.0, 1.0]
