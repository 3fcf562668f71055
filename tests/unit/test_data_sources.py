"""Loading task items from hand-built files and from reasoning-gym."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cipo_nemo.config import load_config
from cipo_nemo.config.schema import DataSourceConfig
from cipo_nemo.data.sources import DataError, LoadReport, TaskItem, describe, load_items

BASE_CONFIG = Path(__file__).parents[2] / "conf" / "cipo_base.yaml"


def file_source(path: Path | str, *overrides: str) -> DataSourceConfig:
    cfg = load_config(BASE_CONFIG, ["data.train.kind=file", f"data.train.file.path={path}", *overrides])
    return cfg.data.train


def gym_source(*overrides: str) -> DataSourceConfig:
    return load_config(BASE_CONFIG, list(overrides)).data.train


def write_jsonl_bytes(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def json_line(row: dict) -> bytes:
    return json.dumps(row).encode("utf-8")


def test_jsonl_skips_bad_rows_counts_them_and_warns_with_line_numbers(tmp_path, caplog):
    path = write_jsonl_bytes(
        tmp_path / "train.jsonl",
        [
            json_line({"prompt": "What is 1 + 1?", "answer": "2"}),  # line 1
            b"{not json",  # line 2
            b'{"prompt": "caf\xff\xfe", "answer": "3"}',  # line 3: not UTF-8
            json_line({"prompt": "What is 2 + 2?"}),  # line 4: no answer
            b"",  # line 5: blank, ignored silently
            json_line({"prompt": "What is 3 + 3?", "answer": "   "}),  # line 6: empty answer
            json_line({"prompt": "What is 4 + 4?", "answer": 8}),  # line 7: a number becomes a string
            b"[1, 2]",  # line 8: JSON but not an object
        ],
    )
    with caplog.at_level(logging.WARNING, logger="cipo_nemo.data.sources"):
        items, report = load_items(file_source(path))

    label = str(path)
    assert [item.answer for item in items] == ["2", "8"]
    assert [item.id for item in items] == [f"{label}:1", f"{label}:7"]
    assert [item.origin for item in items] == [f"{label}:1", f"{label}:7"]
    assert items[0] == TaskItem(
        id=f"{label}:1", family="math", prompt="What is 1 + 1?", messages=None, answer="2",
        origin=f"{label}:1", metadata={},
    )
    assert report.loaded == 2
    assert report.skipped == Counter({"not_json": 2, "not_utf8": 1, "missing_field:answer": 1, "empty_answer": 1})
    messages = [record.getMessage() for record in caplog.records]
    for line_number, reason in [(2, "not_json"), (3, "not_utf8"), (4, "missing_field:answer"), (6, "empty_answer")]:
        assert f"{label}:{line_number}: skipped ({reason})" in messages
    assert not any(f"{label}:5:" in message for message in messages)
    assert messages[-1] == (
        f"{label}: skipped 5 rows in all (not_json=2, not_utf8=1, missing_field:answer=1, empty_answer=1)"
    )
    assert describe(report) == (
        f"{label}: 2 items, skipped 5 (not_json=2, not_utf8=1, missing_field:answer=1, empty_answer=1)"
    )


def test_warnings_are_capped_per_file_with_one_summary(tmp_path, caplog):
    path = write_jsonl_bytes(
        tmp_path / "many.jsonl", [b"oops"] * 25 + [json_line({"prompt": "p", "answer": "a"})]
    )
    with caplog.at_level(logging.WARNING, logger="cipo_nemo.data.sources"):
        items, report = load_items(file_source(path))
    assert len(items) == 1
    assert report.skipped == Counter({"not_json": 25})
    # 10 per-row warnings, one "the rest are only counted" note, one summary.
    assert len(caplog.records) == 12
    assert caplog.records[-1].getMessage() == f"{path}: skipped 25 rows in all (not_json=25)"


def test_custom_field_names_duplicate_ids_and_per_row_family(tmp_path):
    rows = [
        {"uid": "a", "question": "Q1", "solution": "1", "kind": "math"},
        {"uid": "b", "question": "Q2", "solution": {"tests": ["assert f() == 1"]}, "kind": "code"},
        {"uid": "a", "question": "Q3", "solution": "3", "kind": "math"},  # duplicate id
        {"uid": "c", "question": "Q4", "solution": "4", "kind": "poetry"},  # bad family
        {"uid": 7, "question": "Q5", "solution": 2.5, "kind": "math"},
    ]
    path = write_jsonl_bytes(tmp_path / "custom.json", [json_line(row) for row in rows])
    items, report = load_items(
        file_source(
            path,
            "data.train.file.fields.prompt=question",
            "data.train.file.fields.answer=solution",
            "data.train.file.fields.id=uid",
            "data.train.file.fields.family=kind",
        )
    )
    assert [(item.id, item.family, item.prompt, item.answer) for item in items] == [
        ("a", "math", "Q1", "1"),
        ("b", "code", "Q2", {"tests": ["assert f() == 1"]}),
        ("7", "math", "Q5", "2.5"),
    ]
    assert report.skipped == Counter({"duplicate_id": 1, "bad_family": 1})


def test_messages_column_is_validated(tmp_path):
    good = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 5 - 2?"}]
    rows = [
        {"messages": good, "answer": "3"},
        {"messages": "What is 1?", "answer": "1"},  # not a list
        {"messages": [{"role": "user", "content": 5}], "answer": "5"},  # content not a str
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "answer": "1"},
        {"messages": [], "answer": "1"},
    ]
    path = write_jsonl_bytes(tmp_path / "chat.jsonl", [json_line(row) for row in rows])
    items, report = load_items(
        file_source(path, "data.train.file.fields.prompt=null", "data.train.file.fields.messages=messages")
    )
    assert len(items) == 1
    assert items[0].prompt is None
    assert items[0].messages == tuple(good)
    assert report.skipped == Counter({"bad_messages": 4})


def test_parquet_file(tmp_path):
    path = tmp_path / "train.parquet"
    table = pa.table({"prompt": ["What is 6 * 7?", None, "What is 9 - 3?"], "answer": ["42", "1", "6"]})
    pq.write_table(table, path)
    items, report = load_items(file_source(path))
    assert [(item.id, item.prompt, item.answer) for item in items] == [
        (f"{path}[0]", "What is 6 * 7?", "42"),
        (f"{path}[2]", "What is 9 - 3?", "6"),
    ]
    assert report.skipped == Counter({"missing_field:prompt": 1})


def test_parquet_missing_column_is_a_config_error(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"question": ["Q"], "answer": ["1"]}), path)
    with pytest.raises(DataError, match=r"train\.parquet: no column\(s\) prompt .*columns: question, answer"):
        load_items(file_source(path))


def test_hf_disk_dataset(tmp_path):
    directory = tmp_path / "saved"
    datasets.Dataset.from_list(
        [{"prompt": "What is 1 + 2?", "answer": "3"}, {"prompt": "What is 2 + 5?", "answer": "7"}]
    ).save_to_disk(str(directory))
    items, report = load_items(file_source(directory))
    assert [(item.id, item.answer) for item in items] == [(f"{directory}[0]", "3"), (f"{directory}[1]", "7")]
    assert report == LoadReport(source=str(directory), loaded=2, skipped=Counter())


def test_hf_disk_dataset_dict_needs_a_split(tmp_path):
    directory = tmp_path / "saved_dict"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([{"prompt": "T", "answer": "1"}]),
            "test": datasets.Dataset.from_list([{"prompt": "E1", "answer": "2"}, {"prompt": "E2", "answer": "3"}]),
        }
    ).save_to_disk(str(directory))

    items, _ = load_items(file_source(directory, "data.train.file.split=test"))
    assert [(item.prompt, item.origin) for item in items] == [
        ("E1", f"{directory}:test[0]"),
        ("E2", f"{directory}:test[1]"),
    ]
    with pytest.raises(DataError, match="set file.split to one of: train, test"):
        load_items(file_source(directory))
    with pytest.raises(DataError, match="no split 'dev'; available splits: train, test"):
        load_items(file_source(directory, "data.train.file.split=dev"))


def test_file_without_usable_rows_names_file_and_counts(tmp_path):
    path = write_jsonl_bytes(tmp_path / "bad.jsonl", [b"nope", json_line({"prompt": "Q", "answer": ""})])
    with pytest.raises(DataError, match=r"bad\.jsonl: no usable row \(not_json=1, empty_answer=1\)"):
        load_items(file_source(path))


def test_json_array_file_gets_a_hint(tmp_path):
    path = tmp_path / "array.json"
    path.write_text(json.dumps([{"prompt": "Q", "answer": "1"}], indent=1))
    with pytest.raises(DataError, match="looks like one JSON array"):
        load_items(file_source(path))


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match=r"data file not found: .*nowhere\.jsonl"):
        load_items(file_source(tmp_path / "nowhere.jsonl"))
    odd = tmp_path / "train.csv"
    odd.write_text("prompt,answer\n")
    with pytest.raises(DataError, match=r"cannot tell the format from the suffix '\.csv'"):
        load_items(file_source(odd))


def test_reasoning_gym_is_deterministic_with_stable_ids():
    overrides = ["data.train.reasoning_gym.size=5", "data.train.reasoning_gym.seed=3"]
    first, report = load_items(gym_source(*overrides))
    second, _ = load_items(gym_source(*overrides))
    assert first == second
    assert [item.id for item in first] == [f"basic_arithmetic:3:{index}" for index in range(5)]
    assert [item.origin for item in first] == [f"reasoning_gym:basic_arithmetic:{index}" for index in range(5)]
    # Values printed by reasoning-gym 0.1.25 for seed 3 (checked by hand: (56 + -33) - 84 = -61).
    assert first[0].prompt == "Calculate ( 56 + -33 ) - 84."
    assert first[0].answer == "-61"
    assert first[0].metadata["source_index"] == 0
    assert all(item.family == "math" and item.messages is None for item in first)
    assert report.loaded == 5 and not report.skipped
    other_seed, _ = load_items(gym_source("data.train.reasoning_gym.size=5", "data.train.reasoning_gym.seed=4"))
    assert [item.prompt for item in other_seed] != [item.prompt for item in first]


def test_reasoning_gym_options_are_passed_on():
    items, _ = load_items(
        gym_source("data.train.reasoning_gym.size=4", "data.train.reasoning_gym.options={min_terms: 2, max_terms: 2}")
    )
    assert [item.metadata["num_terms"] for item in items] == [2, 2, 2, 2]


def test_reasoning_gym_unknown_generator_suggests_names():
    with pytest.raises(DataError, match="unknown generator 'basic_arithmetc'.*basic_arithmetic"):
        load_items(gym_source("data.train.reasoning_gym.name=basic_arithmetc"))


def test_reasoning_gym_bad_options_name_the_option():
    with pytest.raises(DataError, match=r"reasoning_gym\.options\.max_term: .*valid options: .*max_terms"):
        load_items(gym_source("data.train.reasoning_gym.options={max_term: 3}"))
    with pytest.raises(DataError, match="max_terms must be >= min_terms"):
        load_items(gym_source("data.train.reasoning_gym.options={min_terms: 4, max_terms: 2}"))


def test_unreadable_parquet_names_the_file(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_text("not parquet at all")
    with pytest.raises(DataError, match=r"broken\.parquet: not a readable parquet file"):
        load_items(file_source(path))


def test_verl_parquet_layout_with_dotted_fields_and_a_chat_prompt(tmp_path):
    """verl's layout: `prompt` is a list of chat messages, the gold sits in reward_model.ground_truth."""
    path = tmp_path / "train.parquet"
    rows = [
        {"data_source": "gsm8k", "prompt": [{"role": "user", "content": "What is 2 + 2?"}],
         "reward_model": {"style": "rule", "ground_truth": "4"}, "extra_info": {"index": 0}},
        {"data_source": "gsm8k", "prompt": [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "What is 3 + 4?"}],
         "reward_model": {"style": "rule", "ground_truth": "7"}, "extra_info": {"index": 1}},
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    items, report = load_items(file_source(path, "data.train.file.fields.answer=reward_model.ground_truth"))
    assert report.loaded == 2 and not report.skipped
    assert [item.answer for item in items] == ["4", "7"]
    assert items[0].prompt is None and items[0].messages == ({"role": "user", "content": "What is 2 + 2?"},)
    assert items[1].messages[0] == {"role": "system", "content": "Be brief."}


def test_a_wrong_jsonl_field_names_the_keys_present(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"question": "1+1?", "solution": "2"}\n{"question": "2+2?", "solution": "4"}\n')
    with pytest.raises(DataError, match=r"missing_field:prompt=2.*file\.fields\.\* to the keys present: question, "
                                        r"solution"):
        load_items(file_source(path))
