"""reasoning-gym benchmarks with generator options: the spec's JSON options and reasoning_gym_benchmark."""

from __future__ import annotations

import pytest

from cipo_nemo.data.sources import DataError
from cipo_nemo.eval.benchmarks import BenchmarkError, load_benchmark, parse_benchmark_list, reasoning_gym_benchmark

EASY = '{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}'


def test_spec_options_set_the_generator_difficulty():
    easy = load_benchmark(f"reasoning_gym:chain_sum:20:3:{EASY}")
    default = load_benchmark("reasoning_gym:chain_sum:20:3")
    # two one-digit terms: "a + b =" / "a - b =", answers within [-9, 18]
    assert all(len(item.prompt.split(":")[-1].split("=")[0].split()) == 3 for item in easy.items)
    assert all(-9 <= int(item.answer) <= 18 for item in easy.items)
    assert [item.prompt for item in easy.items] != [item.prompt for item in default.items]
    assert easy.name == "reasoning_gym:chain_sum" and easy.items[0].id == "chain_sum:3:0"


def test_function_matches_the_spec_and_takes_a_label():
    by_spec = load_benchmark(f"reasoning_gym:chain_sum:8:3:{EASY}")
    by_call = reasoning_gym_benchmark("chain_sum", size=8, seed=3, label="easy sums",
                                      options={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1})
    assert by_call.name == "easy sums"
    assert [(i.prompt, i.answer) for i in by_call.items] == [(i.prompt, i.answer) for i in by_spec.items]


def test_bad_options_name_the_problem():
    with pytest.raises(BenchmarkError, match="generator options are not JSON"):
        load_benchmark("reasoning_gym:chain_sum:8:3:{max_terms: 2}")
    with pytest.raises(BenchmarkError, match="must be a JSON object"):
        load_benchmark("reasoning_gym:chain_sum:8:3:[2]")
    with pytest.raises(DataError, match="reasoning_gym.options.max_term: generator 'chain_sum' has no such option"):
        load_benchmark('reasoning_gym:chain_sum:8:3:{"max_term": 2}')


def test_commas_inside_options_do_not_split_the_list():
    text = f"humaneval, reasoning_gym:chain_sum:8:3:{EASY},reasoning_gym:gcd:4:1:{{\"max_value\": [1, 2]}}, a.jsonl"
    assert parse_benchmark_list(text) == ["humaneval", f"reasoning_gym:chain_sum:8:3:{EASY}",
                                          'reasoning_gym:gcd:4:1:{"max_value": [1, 2]}', "a.jsonl"]
