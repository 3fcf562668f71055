"""Correction evaluation on users' files: rows of (problem, attempt, whether it is right, gold, optional template)
as a CriticBench- or DebugBench-style set converts to (examples/correction/critic_debug_sample.jsonl, the worked
example of docs/benchmarks.md); each row's own template in the prompt the model reads; bad rows skipped and
counted with their file and line; the balanced mean in the numbers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from cipo_nemo.config import load_config
from cipo_nemo.data.correction_prompts import render_correction_prompt
from cipo_nemo.eval.benchmarks import load_benchmark
from cipo_nemo.models.tiny import build_tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "correction" / "critic_debug_sample.jsonl"


def test_the_worked_example_loads_with_labels_and_templates():
    benchmark = load_benchmark(str(EXAMPLE))
    assert benchmark.kind == "correction" and benchmark.name == "critic_debug_sample" and not benchmark.skipped
    assert [item.id for item in benchmark.items] == ["sum-wrong", "product-wrong", "difference-right", "half-right",
                                                     "add-buggy", "maximum-right"]
    assert benchmark.attempt_correct == [False, False, True, None, False, True]  # None: the verifier decides
    assert [item.family for item in benchmark.items] == ["math"] * 4 + ["code"] * 2
    assert benchmark.templates[:4] == [None] * 4 and all("Observe the following code" in t
                                                         for t in benchmark.templates[4:])


def test_a_rows_template_is_the_prompt_the_model_reads():
    cfg = load_config(REPO / "conf" / "cipo_base.yaml")
    benchmark = load_benchmark(str(EXAMPLE))
    tokenizer = build_tiny_tokenizer()
    own = render_correction_prompt(benchmark.items[4], benchmark.attempts[4], tokenizer=tokenizer, data=cfg.data,
                                   correction=cfg.cipo, template=benchmark.template_of(4))
    assert "Observe the following code, which may contain a bug.\n\nTask: Write a function add(a, b)" in own
    assert "```python\ndef add(a, b):\n    return a - b\n```" in own
    assert "Here is a previous solution" not in own  # cipo.templates.code is not used for this row
    default = render_correction_prompt(benchmark.items[0], benchmark.attempts[0], tokenizer=tokenizer,
                                       data=cfg.data, correction=cfg.cipo, template=benchmark.template_of(0))
    assert "Here is a previous attempt at this problem." in default and "\\boxed{33}" in default


def test_bad_rows_are_skipped_counted_and_named_by_file_and_line(tmp_path, caplog):
    good = {"prompt": "1 + 1?", "solution": "\\boxed{2}", "answer": "2", "solution_correct": True}
    rows = [good,
            {**good, "template": "Fix this: {attempt}"},  # line 2: no {problem}
            {**good, "template": 7},  # line 3: not a string
            {**good, "solution_correct": "yes"},  # line 4
            {"prompt": "2 + 2?", "answer": "4"}]  # line 5: no attempt
    path = tmp_path / "converted.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with caplog.at_level(logging.WARNING, logger="cipo_nemo.eval.benchmarks"):
        benchmark = load_benchmark(str(path))
    assert len(benchmark.items) == 1
    assert benchmark.skipped == {"bad_template": 2, "bad_solution_correct": 1, "bad_solution": 1}
    assert f"{path}:2: skipped (bad_template): 'template' must be a string with {{problem}} and {{attempt}}" \
        in caplog.text


@pytest.mark.parametrize("labels, expected", [
    ([False, True], (0.25 + 0.75) / 2),  # one of each: the mean of wrong->right and right->right
    ([False, False], None),  # no right attempt: right->right unmeasured, so no balanced mean
])
def test_balanced_mean_needs_both_kinds_of_attempt(labels, expected):
    from cipo_nemo.eval.report import summarize_correction

    rewards = [[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]]
    balanced = summarize_correction(rewards, labels, n=4, k_list=[1])["balanced"]
    assert balanced["avg"] == (pytest.approx(expected) if expected is not None else None)
