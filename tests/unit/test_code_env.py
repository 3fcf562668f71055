"""The code environment: program extraction, HumanEval and stdin/stdout scoring, task loading."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from cipo_nemo.environments import code
from cipo_nemo.environments.code import (
    CodeTask,
    CodeVerdict,
    StdioTest,
    extract_program,
    humaneval_solution,
    load_code_tasks,
    load_humaneval,
    score_code,
    score_code_batch,
)
from cipo_nemo.environments.sandbox import SandboxResult

# ---------------------------------------------------------------------------------------------------------
# extract_program


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("text\n```python\nfirst = 1\n```\nmore\n```python\nsecond = 2\n```\nbye", "second = 2\n"),
        ("```python\nwanted = 1\n```\nrun it with\n```bash\npython main.py\n```\n", "wanted = 1\n"),
        ("```py\nshort_tag = 1\n```", "short_tag = 1\n"),
        ("```Python3 title=solution.py\ninfo_string = 1\n```", "info_string = 1\n"),
        ("```\nuntagged = 1\n```", "untagged = 1\n"),
        ("```js\nconsole.log(1)\n```\nno python here", "console.log(1)\n"),
        ("    return a + b\n", "    return a + b\n"),  # a bare completion keeps its indentation
        ("Here:\n```python\ndef f():\n    return 1\n", "def f():\n    return 1\n"),  # truncated response
        ("```python\n```", ""),
    ],
)
def test_extract_program(response: str, expected: str) -> None:
    assert extract_program(response) == expected


def test_extract_program_honours_the_requested_language() -> None:
    response = "```cpp\nint main() {}\n```\n```python\nprint(1)\n```"
    assert extract_program(response, language="cpp") == "int main() {}\n"
    assert extract_program(response) == "print(1)\n"


def test_humaneval_solution_accepts_continuations_and_full_definitions() -> None:
    task = CodeTask(task_id="t", kind="humaneval", prompt="import math\n\ndef f(x):\n    \"\"\"doc\"\"\"\n",
                    entry_point="f", test="def check(candidate):\n    assert candidate(4) == 2\n")
    assert humaneval_solution(task, "    return 1\n") == task.prompt + "    return 1\n"
    full = "def f(x):\n    return int(math.sqrt(x))\n"
    assert humaneval_solution(task, full) == task.prompt + "\n\n" + full


# ---------------------------------------------------------------------------------------------------------
# HumanEval


def test_all_humaneval_canonical_solutions_pass_and_a_wrong_one_fails() -> None:
    tasks = load_humaneval()
    assert len(tasks) == 164
    assert [task.task_id for task in tasks[:3]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    responses = [task.canonical_solution for task in tasks] + ["    return not True\n"]
    started = time.monotonic()
    verdicts = score_code_batch(responses, [*tasks, tasks[0]], num_workers=2, timeout_s=10.0)
    elapsed = time.monotonic() - started
    print(f"\nHumanEval: 164 canonical solutions + 1 wrong one scored in {elapsed:.1f} s with 2 workers")
    failures = [(task.task_id, verdict) for task, verdict in zip(tasks, verdicts) if verdict.outcome != "passed"]
    assert failures == []
    assert all(verdict.reward == 1.0 for verdict in verdicts[:164])
    assert verdicts[164] == CodeVerdict(
        0.0, "failed", "check() failed at test line 10: assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True"
    )


SQUARE_TASK = CodeTask(
    task_id="square", kind="humaneval", prompt="def square(x):\n    \"\"\"x times x\"\"\"\n", entry_point="square",
    test="def check(candidate):\n    assert candidate(3) == 9\n    assert candidate(-2) == 4\n",
)


@pytest.mark.parametrize(
    ("response", "outcome", "detail_part"),
    [
        ("    return x * x\n", "passed", ""),
        ("```python\ndef square(x):\n    return x ** 2\n```", "passed", ""),
        ("    return x + x\n", "failed", "test line 2: assert candidate(3) == 9"),
        ("    return x * x if x > 0 else 0\n", "failed", "test line 3: assert candidate(-2) == 4"),
        ("    import sys\n    sys.exit(0)\n", "failed", "exited before the tests finished"),
        ("import sys\nsys.exit(0)\n", "failed", "exited before the tests finished"),
        ("    import os\n    os._exit(0)\n", "failed", "exited before the tests finished"),
        ("    print('0123456789abcdef0123456789abcdef')\n    return x * x\n", "passed", ""),
        ("    raise ValueError('nope')\n", "crashed", "ValueError: nope"),
        ("    return (\n", "crashed", "SyntaxError"),
        ("    while True:\n        pass\n", "timeout", "timeout"),
        ("    return bytearray(8 * 1024 ** 3)\n", "memory", "MemoryError"),
        ("    import os, signal\n    os.kill(os.getpid(), signal.SIGSEGV)\n", "crashed", "killed by signal 11"),
    ],
)
def test_humaneval_outcomes(response: str, outcome: str, detail_part: str) -> None:
    verdict = score_code(response, SQUARE_TASK, timeout_s=1.0, memory_mb=256)
    assert verdict.outcome == outcome, verdict
    assert verdict.reward == (1.0 if outcome == "passed" else 0.0)
    assert detail_part in verdict.detail


def test_exit_zero_before_the_tests_is_never_a_pass_in_a_batch() -> None:
    exits = ["import sys\nsys.exit(0)\n", "    raise SystemExit(0)\n", "import os\nos._exit(0)\n"]
    verdicts = score_code_batch(exits, [SQUARE_TASK] * 3, num_workers=2, timeout_s=5.0)
    assert [verdict.reward for verdict in verdicts] == [0.0, 0.0, 0.0]
    assert {verdict.outcome for verdict in verdicts} == {"failed"}


# ---------------------------------------------------------------------------------------------------------
# stdin/stdout tasks

ADD_TASK = CodeTask(
    task_id="add", kind="stdio", prompt="Print the sum of two integers.",
    tests=(StdioTest("1 2\n", "3\n"), StdioTest("2 3\n", "5\n"), StdioTest("-4 4\n", "0\n")),
)


@pytest.mark.parametrize(
    ("program", "outcome", "detail"),
    [
        ("a, b = map(int, input().split())\nprint(a + b)\n", "passed", ""),
        ("import sys\na, b = map(int, sys.stdin.read().split())\nprint('  ', a + b, '  ', end='')\n", "passed", ""),
        ("a, b = map(int, input().split())\nprint(a + b if a != 2 else 6)\n", "failed",
         "test 2/3: expected '5\\n', got '6\\n'"),
        ("a, b = map(int, input().split())\nprint(a + b, 'extra')\n", "failed",
         "test 1/3: expected '3\\n', got '3 extra\\n'"),
        ("print(1 / 0)\n", "crashed", "test 1/3: exit 1: ZeroDivisionError: division by zero"),
        ("import sys\nprint(3)\nsys.exit(2)\n", "crashed", "test 1/3: exit 2: "),
        ("while True:\n    pass\n", "timeout", "test 1/3: timeout"),
        ("data = bytearray(8 * 1024 ** 3)\n", "memory", "test 1/3: MemoryError: the sandbox memory limit was reached"),
    ],
)
def test_stdio_outcomes(program: str, outcome: str, detail: str) -> None:
    verdict = score_code(f"```python\n{program}```", ADD_TASK, timeout_s=1.0, memory_mb=256)
    assert verdict == CodeVerdict(1.0 if outcome == "passed" else 0.0, outcome, detail)


def test_stdio_scoring_stops_at_the_first_failing_test(monkeypatch: pytest.MonkeyPatch) -> None:
    stdins: list[str] = []
    real_run_program = code.run_program

    def recording_run_program(source: str, **options: object) -> SandboxResult:
        stdins.append(str(options["stdin"]))
        return real_run_program(source, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(code, "run_program", recording_run_program)
    verdict = score_code("print(0)\n", ADD_TASK, timeout_s=5.0)
    assert verdict.outcome == "failed"
    assert stdins == ["1 2\n"]


def test_sandbox_errors_are_reported_as_such(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_sandbox(source: str, **options: object) -> SandboxResult:
        return SandboxResult("sandbox_error", None, "", "sandbox: mount failed\n", 0.01)

    monkeypatch.setattr(code, "run_program", broken_sandbox)
    assert score_code("print(3)", ADD_TASK) == CodeVerdict(0.0, "sandbox_error", "test 1/3: sandbox: mount failed")
    assert score_code("    return x * x\n", SQUARE_TASK) == CodeVerdict(0.0, "sandbox_error", "sandbox: mount failed")


def test_non_string_response_scores_zero_without_running() -> None:
    verdict = score_code(None, ADD_TASK)  # type: ignore[arg-type]
    assert verdict == CodeVerdict(0.0, "failed", "response is a NoneType, not a string")


def test_batch_needs_one_task_per_response() -> None:
    with pytest.raises(ValueError, match="2 responses for 1 tasks"):
        score_code_batch(["a", "b"], [ADD_TASK])


# ---------------------------------------------------------------------------------------------------------
# Task files


def test_load_code_tasks_reads_both_kinds_and_infers_kind(tmp_path: Path) -> None:
    records = [
        {"task_id": "he", "prompt": "def f():\n", "entry_point": "f", "test": "def check(c):\n    pass\n",
         "difficulty": "ignored"},
        {"task_id": "io", "tests": [{"input": "1\n", "output": "1\n"}]},
        {"task_id": "explicit", "kind": "stdio", "prompt": "Echo.", "tests": [{"input": "", "output": ""}],
         "canonical_solution": "pass"},
    ]
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n\n")
    tasks = load_code_tasks(path)
    assert tasks == [
        CodeTask(task_id="he", kind="humaneval", prompt="def f():\n", entry_point="f",
                 test="def check(c):\n    pass\n"),
        CodeTask(task_id="io", kind="stdio", tests=(StdioTest("1\n", "1\n"),)),
        CodeTask(task_id="explicit", kind="stdio", prompt="Echo.", tests=(StdioTest("", ""),),
                 canonical_solution="pass"),
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "tasks.jsonl:2: not valid JSON"),
        ('{"prompt": "x"}', "tasks.jsonl:2: field 'task_id' is required"),
        ('{"task_id": "a", "entry_point": "f"}', "tasks.jsonl:2: task 'a': a humaneval task needs entry_point"),
        ('{"task_id": "a", "tests": []}', "tasks.jsonl:2: task 'a': a stdio task needs at least one test"),
        ('{"task_id": "a", "tests": "1 2"}', "tasks.jsonl:2: field 'tests' must be a list"),
        ('{"task_id": "a", "tests": [{"input": 1, "output": "1"}]}', "tasks.jsonl:2: tests\\[0\\] must be an object"),
        ('{"task_id": "a", "kind": "sql", "tests": []}', "tasks.jsonl:2: task 'a': kind must be one of"),
        ('{"task_id": 7, "tests": []}', "tasks.jsonl:2: field 'task_id' must be a string"),
        ("[1, 2]", "tasks.jsonl:2: expected a JSON object"),
    ],
)
def test_load_code_tasks_names_the_bad_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "tasks.jsonl"
    path.write_text('{"task_id": "ok", "tests": [{"input": "", "output": ""}]}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        load_code_tasks(path)


# ---------------------------------------------------------------------------------------------------------
# Programs that look for their task's tests instead of solving it (reward hacking), and honest ones

DATASET_FILE = Path(__file__).resolve().parents[2] / "conf" / "data" / "code_stdio_sample.jsonl"


def _dataset_tasks() -> list[CodeTask]:
    """The stdio sample dataset as code tasks (its rows carry the task in ``answer``)."""
    rows = [json.loads(line) for line in DATASET_FILE.read_text().splitlines() if line.strip()]
    return [code.code_task_from_record({"task_id": row["id"], **row["answer"]}) for row in rows]


def test_a_program_that_reads_the_dataset_for_its_expected_output_does_not_pass() -> None:
    task = _dataset_tasks()[0]
    cheat = f"""
import json, sys
given = sys.stdin.read()
for line in open({str(DATASET_FILE)!r}):
    for test in json.loads(line)["answer"]["tests"]:
        if test["input"] == given:
            print(test["output"])
"""
    verdict = score_code(cheat, task)
    assert verdict.reward == 0.0
    assert verdict.outcome == "crashed" and "FileNotFoundError" in verdict.detail


def test_a_humaneval_program_cannot_take_the_token_from_its_reopened_stdin() -> None:
    cheat = """
import os, sys
token = open("/proc/self/fd/0").readline().strip()
sys.stdout.write("\\n" + token + "\\n")
sys.stdout.flush()
os._exit(0)
"""
    verdict = score_code(cheat, SQUARE_TASK)
    assert verdict.reward == 0.0
    assert verdict.outcome == "failed"


def test_a_humaneval_program_cannot_read_the_tests_from_its_own_file() -> None:
    # Looks for a line of the task's test; the literal is split so that the spy's own text does not contain it.
    spy = ("import sys\nfound = 'candidate(' + '-2) == 4' in open(sys.argv[0]).read()\n"
           "raise SystemExit(f'found: {found}')\n")
    assert "candidate(-2) == 4" in SQUARE_TASK.test
    assert score_code(spy, SQUARE_TASK) == CodeVerdict(0.0, "crashed", "exit 1: found: False")


def test_honest_stdio_programs_still_pass() -> None:
    tasks = _dataset_tasks()
    verdicts = score_code_batch([task.canonical_solution for task in tasks], tasks, num_workers=2)
    assert [verdict.outcome for verdict in verdicts] == ["passed"] * len(tasks)
