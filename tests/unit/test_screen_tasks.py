"""The task screen's pure parts (benchmarks/studies/screen_tasks.py): attempt choice, the numbers, the verdict, the
table."""

from __future__ import annotations

import pytest

from benchmarks.studies.screen_tasks import (
    CONFIGS, FORMATS, HARD_K, choose_attempts, correction_benchmark, correction_numbers, markdown_table, verdict)
from cipo_nemo.data.sources import TaskItem


def _problem(rewards):
    return {"rewards": rewards}


def test_attempts_alternate_wrong_and_right_and_plain_leaves_the_attempt_out():
    chosen = choose_attempts([_problem([1, 0, 1, 0]), _problem([0, 0, 1, 1]), _problem([1, 1]), _problem([0, 0])])
    # even: a wrong attempt (the first wrong sample); odd: a right one
    assert [(c["pick"], c["correct"]) for c in chosen] == [(1, False), (2, True), (0, True), (0, False)]
    assert chosen[0]["plain"] == pytest.approx(2 / 3)  # the other samples [1, 1, 0]
    assert chosen[1]["plain"] == pytest.approx(1 / 3)  # [0, 0, 1]: the chosen right sample is left out
    assert chosen[2]["plain"] == 1.0 and chosen[3]["plain"] == 0.0
    assert choose_attempts([_problem([1])])[0]["plain"] is None  # one sample: nothing left to compare with


def test_correction_benchmark_quotes_the_chosen_response_with_its_label():
    from cipo_nemo.eval.benchmarks import Benchmark

    items = [TaskItem(id=f"p{i}", family="math", prompt=f"{i}+1", messages=None, answer=str(i + 1),
                      origin="test", metadata={}) for i in range(2)]
    answers = Benchmark(name="sums", kind="answer", items=items, source="test")
    samples = [{"id": "p1", "responses": ["a", "b"], "rewards": [0, 1]},
               {"id": "p0", "responses": ["c", "d"], "rewards": [1, 0]}]
    chosen = choose_attempts(samples)
    bench = correction_benchmark(answers, samples, chosen)
    assert bench.kind == "correction" and [item.id for item in bench.items] == ["p1", "p0"]
    assert bench.attempts == ["a", "c"] and bench.attempt_correct == [False, True]


def _correction_record(retention, success, right=3, wrong=5):
    return {"metrics": {"all": {"avg": 0.5}, "retention": {"avg": retention, "problems": right},
                        "correction_success": {"avg": success, "problems": wrong}}}


def test_correction_numbers_compare_with_plain_accuracy_on_the_same_problems():
    chosen = [{"correct": True, "plain": 0.4}, {"correct": True, "plain": 0.6}, {"correct": False, "plain": 0.1}]
    numbers = correction_numbers(_correction_record(0.9, 0.05, right=2, wrong=1), chosen)
    assert numbers["plain_on_right"] == pytest.approx(0.5) and numbers["plain_on_wrong"] == pytest.approx(0.1)
    assert numbers["retention_gain"] == pytest.approx(0.4) and numbers["correction_gain"] == pytest.approx(-0.05)
    none_right = correction_numbers(_correction_record(None, 0.2, right=0), [{"correct": False, "plain": 0.1}])
    assert none_right["retention_gain"] is None and none_right["plain_on_right"] is None


def _row(pass1, hard_pass, retention_gain, correction_gain=-0.1):
    row = {"label": "x", "generator": "chain_sum", "options": {}, "format": "short", "temperature": 1.0,
           "max_new_tokens": 64, "seconds": 60.0,
           "answers": {"problems": 64, "n": 8, "pass@1": pass1, "pass@8": 0.9, "no_answer": 0.1, "truncated": 0.0},
           "correction": {"retention": 0.7, "plain_on_right": 0.5, "right_anchors": 30, "correction_success": 0.1,
                          "plain_on_wrong": 0.2, "wrong_anchors": 34, "retention_gain": retention_gain,
                          "correction_gain": correction_gain}}
    if hard_pass is not None:
        row["hard"] = {"problems": 32, "n": 32, "pass@1": 0.1, f"pass@{HARD_K}": hard_pass}
    return row


@pytest.mark.parametrize(("row", "qualifies", "failure"), [
    (_row(0.3, 0.6, 0.2), True, None),
    (_row(0.1, 0.6, 0.2), False, "pass@1 0.100 outside 0.2-0.6"),
    (_row(0.7, 0.6, 0.2), False, "pass@1 0.700 outside"),
    (_row(0.3, 0.8, 0.2), False, "hard pass@32 0.800 > 0.7"),
    (_row(0.3, None, 0.2), False, "hard split not measured"),
    (_row(0.3, 0.6, 0.01), False, "no use of the attempt"),
    (_row(0.3, 0.6, None, correction_gain=0.1), True, None),  # fixing wrong attempts is use too
])
def test_verdict(row, qualifies, failure):
    ok, failures = verdict(row)
    assert ok is qualifies
    assert (failure is None and not failures) or any(failure in text for text in failures)


def test_table_has_one_line_per_row_with_the_verdict():
    table = markdown_table([_row(0.3, 0.6, 0.2), _row(0.1, None, 0.0)]).splitlines()
    assert len(table) == 4 and table[0].count("|") == table[1].count("|") == table[2].count("|")
    assert "| yes |" in table[2] and "| no: pass@1 0.100" in table[3]
    assert "| 0.700 (0.500, 30) |" in table[2]


def test_configurations_use_known_formats_and_temperature_relabels():
    assert {config.prompt_format for config in CONFIGS.values()} == set(FORMATS)
    cold = CONFIGS["chain_1d2t_short"].at_temperature(0.7)
    assert cold.label == "chain_1d2t_short_t0.7" and cold.temperature == 0.7
    assert CONFIGS["chain_1d2t_short"].at_temperature(1.0) is CONFIGS["chain_1d2t_short"]


def test_the_embedded_default_asks_in_the_screened_format():
    """conf/cipo_smollm2_cpu.yaml uses the sys_answer_is format the screen measured (docs/results/task_screen.md):
    the same system prompt, instruction, correction template and response budget."""
    from benchmarks.studies.screen_tasks import CONFIG
    from cipo_nemo.config import load_config

    cfg, screened = load_config(CONFIG), FORMATS["sys_answer_is"]
    assert cfg.data.system_prompt == screened.system_prompt
    assert cfg.data.instructions.math == screened.instruction
    assert cfg.cipo.templates.math == screened.correction_template
    assert cfg.generation.max_new_tokens == screened.max_new_tokens
    screened_task = CONFIGS["ba_1d2t_sys_answer_is"]
    assert cfg.data.train.reasoning_gym.name == screened_task.generator
    assert cfg.data.train.reasoning_gym.options == dict(screened_task.options)
    assert cfg.generation.temperature == 0.5  # the screened temperature (--temperature 0.5)
