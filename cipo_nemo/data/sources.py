"""Task items from reasoning-gym generators, user files (JSONL, parquet, `datasets.save_to_disk` directories) or
hub datasets (`kind: hf`, read through `datasets.load_dataset`; cipo_nemo/data/hub_datasets.py).

A bad row never stops a run: it is skipped, counted by reason in a `LoadReport` and logged (a few warnings per
file, then one summary), so that a million broken rows cost one screen of log, not a million lines. A source
that yields no usable row at all is a `DataError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
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

logger = logging.getLogger(__name__)

TASK_FAMILIES: tuple[str, ...] = ("math", "code")
CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant")
MAX_WARNINGS_PER_SOURCE = 10
_JSONL_SUFFIXES = (".jsonl", ".json")


class DataError(ValueError):
    """A data source that cannot be used; the message names the file (or generator) and the problem."""


@dataclass(frozen=True)
class TaskItem:
    """One problem with its ground truth. Exactly one of `prompt` and `messages` is set.

    `answer` is a non-empty str for math and any JSON value (e.g. a dict of tests) for code. `origin` says where
    the item came from ("data/train.jsonl:17", "data/train.parquet[16]", "reasoning_gym:basic_arithmetic:3").
    Unhashable fields are left out of the hash.
    """

    id: str
    family: Literal["math", "code"]
    prompt: str | None
    messages: tuple[dict[str, str], ...] | None = field(hash=False)
    answer: Any = field(hash=False)
    origin: str
    metadata: Mapping[str, Any] = field(hash=False)

    def __post_init__(self) -> None:
        assert (self.prompt is None) != (self.messages is None), "exactly one of prompt and messages"
        assert self.family in TASK_FAMILIES, self.family


@dataclass
class LoadReport:
    """What loading one source gave: items kept and rows skipped per reason."""

    source: str
    loaded: int = 0
    skipped: Counter[str] = field(default_factory=Counter)


class RowSkipped(Exception):
    """A row is unusable for `reason` (a LoadReport reason key)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def describe(report: LoadReport) -> str:
    """One log line, e.g. "data/train.jsonl: 97 items, skipped 3 (not_json=2, empty_answer=1)"."""
    line = f"{report.source}: {report.loaded} items"
    total_skipped = sum(report.skipped.values())
    if total_skipped:
        reasons = ", ".join(f"{reason}={count}" for reason, count in report.skipped.most_common())
        line += f", skipped {total_skipped} ({reasons})"
    return line


def load_items(cfg: DataSourceConfig) -> tuple[list[TaskItem], LoadReport]:
    """All usable items of one source, in source order, and the report of what was skipped."""
    if cfg.kind == "reasoning_gym":
        return _load_reasoning_gym(cfg.reasoning_gym, family=cfg.family)
    if cfg.kind == "hf":
        return _load_hub(cfg.hf, family=cfg.family)
    return _load_file(cfg.file, family=cfg.family)


# ---------------------------------------------------------------------------------------------- reasoning-gym


def _load_reasoning_gym(cfg: ReasoningGymSourceConfig, *, family: str) -> tuple[list[TaskItem], LoadReport]:
    dataset = _create_generator_dataset(cfg)
    report = LoadReport(source=f"reasoning_gym:{cfg.name}(seed={cfg.seed}, size={cfg.size})")
    items: list[TaskItem] = []
    for index in range(len(dataset)):
        entry = dataset[index]
        origin = f"reasoning_gym:{cfg.name}:{index}"
        try:
            answer = _check_answer(entry["answer"], family=family)
            prompt = _check_prompt(entry["question"])
        except RowSkipped as skip:
            report.skipped[skip.reason] += 1
            logger.warning("%s: skipped (%s)", origin, skip.reason)
            continue
        items.append(
            TaskItem(
                id=f"{cfg.name}:{cfg.seed}:{index}",
                family=family,
                prompt=prompt,
                messages=None,
                answer=answer,
                origin=origin,
                metadata=entry["metadata"],
            )
        )
    report.loaded = len(items)
    if not items:
        raise DataError(f"{report.source}: no usable item ({_skip_counts(report)})")
    return items, report


def _create_generator_dataset(cfg: ReasoningGymSourceConfig) -> Any:
    """`reasoning_gym.create_dataset` with the library's errors turned into DataErrors naming name and option."""
    # Imported here: reasoning-gym and datasets take seconds to import and most runs need only one of them.
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if cfg.name not in DATASETS:
        suggestions = difflib.get_close_matches(cfg.name, DATASETS, n=5, cutoff=0.5) or sorted(DATASETS)[:8]
        raise DataError(
            f"reasoning_gym: unknown generator {cfg.name!r}; close or valid names: {', '.join(suggestions)} "
            f"({len(DATASETS)} generators in all)"
        )
    _, config_class = DATASETS[cfg.name]
    accepted = sorted(f.name for f in dataclasses.fields(config_class) if f.name not in ("size", "seed"))
    for option in cfg.options:
        if option in ("size", "seed"):
            raise DataError(f"reasoning_gym.options.{option}: set reasoning_gym.{option} instead")
        if option not in accepted:
            raise DataError(
                f"reasoning_gym.options.{option}: generator {cfg.name!r} has no such option; "
                f"valid options: {', '.join(accepted)}"
            )
    try:
        return reasoning_gym.create_dataset(cfg.name, size=cfg.size, seed=cfg.seed, **cfg.options)
    except (AssertionError, ValueError, TypeError) as error:  # reasoning-gym validates its configs with asserts
        raise DataError(f"reasoning_gym: generator {cfg.name!r} rejects options {cfg.options}: {error}") from error


# ---------------------------------------------------------------------------------------------- files


def _load_file(cfg: FileSourceConfig, *, family: str) -> tuple[list[TaskItem], LoadReport]:
    assert cfg.path is not None, "the schema requires file.path when kind is 'file'"
    path = Path(cfg.path)
    if not path.exists():
        raise DataError(f"data file not found: {cfg.path} (resolved to {path.resolve()})")
    file_format = _resolve_format(path, cfg.format)
    if cfg.split is not None and file_format != "hf_disk":
        raise DataError(f"{cfg.path}: file.split={cfg.split!r} only applies to a saved DatasetDict (hf_disk)")
    if file_format == "jsonl":
        rows = jsonl_rows(path, label=cfg.path)
    elif file_format == "parquet":
        rows = _parquet_rows(path, label=cfg.path, fields=cfg.fields)
    else:
        rows = _hf_disk_rows(path, label=cfg.path, split=cfg.split, fields=cfg.fields)
    items, report = _collect_items(rows, source=cfg.path, fields=cfg.fields, family=family)
    if not items:
        raise DataError(f"{cfg.path}: no usable row ({_skip_counts(report)}){_json_array_hint(path, file_format)}"
                        f"{_missing_field_hint(path, file_format, report)}")
    return items, report


def _resolve_format(path: Path, configured: str) -> str:
    if configured != "auto":
        return configured
    if path.is_dir():
        return "hf_disk"
    if path.suffix.lower() in _JSONL_SUFFIXES:
        return "jsonl"
    if path.suffix.lower() == ".parquet":
        return "parquet"
    raise DataError(
        f"{path}: cannot tell the format from the suffix {path.suffix!r}; "
        "use .jsonl/.json, .parquet or a datasets.save_to_disk directory, or set file.format"
    )


# A row is (location, parsed row) or (location, reason it could not even be parsed).
_Row = tuple[str, Mapping[str, Any] | RowSkipped]


def jsonl_rows(path: Path, *, label: str) -> Iterator[_Row]:
    """Rows of a JSON Lines file, read as bytes so that one line that is not UTF-8 skips only itself; a line that
    is not a JSON object is a RowSkipped("not_json"), blank lines are passed over. Shared with the eval harness."""
    with path.open("rb") as handle:
        for line_number, raw_line in enumerate(handle, start=1):
            location = f"{label}:{line_number}"
            try:
                # utf-8-sig on line 1 tolerates the byte-order mark some editors write.
                text = raw_line.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError:
                yield location, RowSkipped("not_utf8")
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError:
                yield location, RowSkipped("not_json")
                continue
            yield location, row if isinstance(row, dict) else RowSkipped("not_json")


def _parquet_rows(path: Path, *, label: str, fields: FileFields) -> Iterator[_Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet_file = pq.ParquetFile(path)
    except pa.ArrowInvalid as error:
        raise DataError(f"{label}: not a readable parquet file ({error})") from error
    columns = _required_columns(fields)
    _check_columns(label, available=parquet_file.schema_arrow.names, required=columns)
    row_index = 0
    for record_batch in parquet_file.iter_batches(columns=columns):
        for row in record_batch.to_pylist():
            yield f"{label}[{row_index}]", row
            row_index += 1


def _hf_disk_rows(path: Path, *, label: str, split: str | None, fields: FileFields) -> Iterator[_Row]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise DataError(f"{label}: not a datasets.save_to_disk directory ({error})") from error
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            raise DataError(f"{label}: holds a DatasetDict; set file.split to one of: {', '.join(loaded)}")
        if split not in loaded:
            raise DataError(f"{label}: no split {split!r}; available splits: {', '.join(loaded)}")
        dataset = loaded[split]
        label = f"{label}:{split}"
    elif split is not None:
        raise DataError(f"{label}: file.split={split!r} is set but the directory holds a plain Dataset")
    else:
        dataset = loaded
    yield from dataset_rows(dataset, label=label, fields=fields)


# ---------------------------------------------------------------------------------------------- hub datasets


def _load_hub(cfg: HubSourceConfig, *, family: str) -> tuple[list[TaskItem], LoadReport]:
    """A split of a hub dataset that the preflight has made present (never downloads here)."""
    from cipo_nemo.data.hub_datasets import load_split, resolve_dataset_dir, split_label

    assert cfg.path is not None, "the schema requires hf.path when kind is 'hf'"
    label = split_label(cfg.path, cfg.name, cfg.split)
    directory = resolve_dataset_dir(cfg.path, cfg.revision, key="hf.path")
    dataset = load_split(directory, name=cfg.name, split=cfg.split, label=label)
    items, report = _collect_items(dataset_rows(dataset, label=label, fields=cfg.fields), source=label,
                                   fields=cfg.fields, family=family)
    if not items:
        raise DataError(f"{label}: no usable row ({_skip_counts(report)}); columns: {', '.join(dataset.column_names)}")
    return items, report


def dataset_rows(dataset: Any, *, label: str, fields: FileFields) -> Iterator[_Row]:
    """Rows of a `datasets.Dataset`, only the columns the fields read (a missing column is one DataError)."""
    columns = _required_columns(fields)
    _check_columns(label, available=dataset.column_names, required=columns)
    for row_index, row in enumerate(dataset.select_columns(columns)):
        yield f"{label}[{row_index}]", row


def _required_columns(fields: FileFields) -> list[str]:
    """Top-level columns the fields read (a dotted path `reward_model.ground_truth` reads `reward_model`)."""
    names = (fields.id, fields.prompt, fields.messages, fields.answer, fields.family)
    return list(dict.fromkeys(name.split(".")[0] for name in names if name is not None))


def _check_columns(label: str, *, available: Iterable[str], required: list[str]) -> None:
    """A column missing from a whole table is a config error, not a million skipped rows."""
    available = list(available)
    missing = [column for column in required if column not in available]
    if missing:
        raise DataError(
            f"{label}: no column(s) {', '.join(missing)} (set data.<train|validation>.<file|hf>.fields.*); "
            f"columns: {', '.join(available)}"
        )


def _collect_items(
    rows: Iterable[_Row], *, source: str, fields: FileFields, family: str
) -> tuple[list[TaskItem], LoadReport]:
    report = LoadReport(source=source)
    items: list[TaskItem] = []
    seen_ids: set[str] = set()
    for location, row in rows:
        try:
            if isinstance(row, RowSkipped):
                raise row
            item = _row_to_item(row, location=location, fields=fields, default_family=family)
            if item.id in seen_ids:
                raise RowSkipped("duplicate_id")
        except RowSkipped as skip:
            _record_skip(report, location=location, reason=skip.reason)
            continue
        seen_ids.add(item.id)
        items.append(item)
    report.loaded = len(items)
    total_skipped = sum(report.skipped.values())
    if total_skipped:
        logger.warning("%s: skipped %d rows in all (%s)", source, total_skipped, _skip_counts(report))
    return items, report


def _record_skip(report: LoadReport, *, location: str, reason: str) -> None:
    report.skipped[reason] += 1
    total_skipped = sum(report.skipped.values())
    if total_skipped <= MAX_WARNINGS_PER_SOURCE:
        logger.warning("%s: skipped (%s)", location, reason)
    elif total_skipped == MAX_WARNINGS_PER_SOURCE + 1:
        logger.warning("%s: more rows skipped; the rest are only counted in the summary", report.source)


def _row_to_item(row: Mapping[str, Any], *, location: str, fields: FileFields, default_family: str) -> TaskItem:
    family = default_family if fields.family is None else _required_value(row, fields.family)
    if family not in TASK_FAMILIES:
        raise RowSkipped("bad_family")
    prompt, messages = None, None
    if fields.prompt is not None:
        value = _required_value(row, fields.prompt)
        # a list in the prompt column is a chat (verl's parquet, TRL's conversational datasets)
        prompt, messages = (None, _check_messages(value)) if isinstance(value, list) else (_check_prompt(value), None)
    else:
        messages = _check_messages(_required_value(row, fields.messages))
    answer = _check_answer(_required_value(row, fields.answer), family=family)
    item_id = location if fields.id is None else str(_required_value(row, fields.id))
    return TaskItem(
        id=item_id, family=family, prompt=prompt, messages=messages, answer=answer, origin=location, metadata={}
    )


def _required_value(row: Mapping[str, Any], column: str) -> Any:
    """`row[column]`, or along a dotted path into nested mappings (`reward_model.ground_truth`)."""
    value: Any = row
    for key in column.split("."):
        value = value.get(key) if isinstance(value, Mapping) else None
        if value is None:
            raise RowSkipped(f"missing_field:{column}")
    return value


def _check_prompt(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RowSkipped("bad_prompt")
    return value


def _check_messages(value: Any) -> tuple[dict[str, str], ...]:
    """A non-empty list of {role, content} string dicts with known roles, ending with the user's turn."""
    if not isinstance(value, list) or not value:
        raise RowSkipped("bad_messages")
    messages = []
    for message in value:
        if not isinstance(message, dict):
            raise RowSkipped("bad_messages")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES or not isinstance(content, str):
            raise RowSkipped("bad_messages")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise RowSkipped("bad_messages")
    return tuple(messages)


def _check_answer(value: Any, *, family: str) -> Any:
    """Math answers become non-empty strings; code answers are any non-empty JSON value."""
    if family == "math":
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise RowSkipped("bad_answer")
        value = str(value)
    if _is_empty(value):
        raise RowSkipped("empty_answer")
    return value


def _is_empty(value: Any) -> bool:
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, (list, dict)):
        return not value
    return value is None


def _skip_counts(report: LoadReport) -> str:
    if not report.skipped:
        return "nothing skipped"
    return ", ".join(f"{reason}={count}" for reason, count in report.skipped.most_common())


def _missing_field_hint(path: Path, file_format: str, report: LoadReport) -> str:
    """When rows lack a field, the keys the first row of a JSON Lines file does have."""
    if file_format != "jsonl" or not any(reason.startswith("missing_field:") for reason in report.skipped):
        return ""
    first = next((row for _, row in jsonl_rows(path, label=str(path)) if not isinstance(row, RowSkipped)), None)
    if first is None:
        return ""
    return f"; set data.<train|validation>.file.fields.* to the keys present: {', '.join(first)}"


def _json_array_hint(path: Path, file_format: str) -> str:
    if file_format != "jsonl" or not path.is_file():
        return ""
    with path.open("rb") as handle:
        start = handle.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    if start[:1] != b"[":
        return ""
    return "; the file looks like one JSON array: write one JSON object per line (JSON Lines)"
