"""The evaluation harness end to end: the tiny warm-started arithmetic model (it answers "#### n" for "What is a + b?",
sometimes right) through the CLI with the HF backend on a math file, a correction file and HumanEval; the same
model with vLLM against HF at temperature 0; SmolLM2-135M-Instruct on a handful of problems.

Every reported number is recomputed here from the per-sample rewards the results record (pass@k from math.comb,
independently of cipo_nemo.eval.passk), and the rewards themselves are checked by hand against the responses.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from cipo_nemo.data.correction_prompts import build_correction_prompt
from cipo_nemo.config import load_config
from cipo_nemo.data.prompts import problem_text, render_chat, render_prompt
from cipo_nemo.environments.code import OUTCOMES
from cipo_nemo.environments.math import score_one
from cipo_nemo.eval.__main__ import main
from cipo_nemo.eval.benchmarks import load_benchmark, load_humaneval_benchmark
from cipo_nemo.eval.harness import evaluate
from cipo_nemo.models.hub import SMOLLM2_ID

pytestmark = pytest.mark.slow  # the evaluation harness end to end, vLLM engines

BASE = Path(__file__).resolve().parents[2] / "conf" / "cipo_base.yaml"
N, K = 4, [1, 2, 4]
MAX_NEW_TOKENS, MAX_MODEL_LEN = 12, 512
OVERRIDES = [f"generation.max_new_tokens={MAX_NEW_TOKENS}", f"policy.max_total_sequence_length={MAX_MODEL_LEN}",
             "verifier.num_workers=1", "cipo.attempt_max_tokens=32"]
MATH_SUMS = [(0, 1), (1, 2), (2, 2), (3, 4)]
CORRECTION_ROWS = [
    {"prompt": "What is 1 + 3?", "solution": "#### 4", "answer": "4", "solution_correct": True},
    {"prompt": "What is 2 + 3?", "solution": "#### 7", "answer": "5"},  # no label: the verifier says wrong
    {"prompt": "What is 4 + 0?", "solution": "#### 4", "answer": "4"},  # no label: the verifier says right
    {"prompt": "What is 3 + 3?", "solution": "#### 1", "answer": "6", "solution_correct": False},
    {"prompt": "What is 3 + 1?", "answer": "4"},  # line 5: no solution, skipped
]
SOLUTION_CORRECT = [True, False, True, False]
JUDGED_BY = ["label", "verifier", "verifier", "label"]
HUMANEVAL_PROBLEMS = 4
_CLEAN_ANSWER = re.compile(r"#### (\d+)")


# ---------------------------------------------------------------------------------------------- helpers


def expected_pass_at_k(rewards: list[list[float]], k: int) -> float:
    """Mean over problems of 1 - C(n-c, k) / C(n, k), with exact binomials."""
    values = []
    for problem in rewards:
        n, c = len(problem), sum(reward > 0.5 for reward in problem)
        values.append(1 - math.comb(n - c, k) / math.comb(n, k))
    return sum(values) / len(values)


def assert_summary_matches(summary: dict, rewards: list[list[float]], *, n: int, k_list: list[int]) -> None:
    assert summary["problems"] == len(rewards) and summary["n"] == n and summary["samples"] == n * len(rewards)
    assert all(len(problem) == n for problem in rewards)
    flat = [reward for problem in rewards for reward in problem]
    assert summary["avg"] == pytest.approx(sum(flat) / len(flat), abs=1e-12)
    for k in k_list:
        assert summary["pass@k"][str(k)] == pytest.approx(expected_pass_at_k(rewards, k), abs=1e-12)


def gold_of(prompt: str) -> int:
    a, b = re.search(r"What is (\d+) \+ (\d+)\?", prompt).groups()
    return int(a) + int(b)


def assert_rewards_hand_checked(samples: list[dict]) -> int:
    """Each reward is the verifier's in-process verdict, and for a clean "#### n" response it is 1 exactly when
    n is the sum asked for. Returns how many responses were clean."""
    clean = 0
    for record in samples:
        gold = gold_of(record["prompt"])
        for response, reward in zip(record["responses"], record["rewards"], strict=True):
            assert reward == score_one(response, str(gold)).reward
            match = _CLEAN_ANSWER.fullmatch(response.strip())
            if match:
                clean += 1
                assert reward == float(int(match.group(1)) == gold), (response, gold)
    return clean


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def read_samples(path: Path) -> dict[str, list[dict]]:
    by_benchmark: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        by_benchmark.setdefault(record["benchmark"], []).append(record)
    return by_benchmark


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def benchmark_files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("benchmarks")
    math_rows = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in MATH_SUMS]
    math_file = write_jsonl(root / "arith.jsonl", [*math_rows, "{broken", {"prompt": "What is 1 + 1?"}])
    return math_file, write_jsonl(root / "fix.jsonl", CORRECTION_ROWS)


@pytest.fixture(scope="module")
def hf_run(arithmetic_model, benchmark_files, tmp_path_factory) -> dict:
    """One CLI run (HF backend, sampling at temperature 1) over the math file, the correction file, HumanEval."""
    math_file, correction_file = benchmark_files
    output_dir = tmp_path_factory.mktemp("hf_run")
    argv = ["--model", str(arithmetic_model.model_dir), "--benchmarks", f"{math_file},{correction_file},humaneval",
            "--n", str(N), "--k", ",".join(map(str, K)), "--max-items", str(HUMANEVAL_PROBLEMS),
            "--output-dir", str(output_dir), "--config", str(BASE), "generation.backend=hf", *OVERRIDES]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = main(argv)
    assert status == 0
    return {"results": json.loads((output_dir / "results.json").read_text()),
            "samples": read_samples(output_dir / "samples.jsonl"), "stdout": stdout.getvalue(),
            "output_dir": output_dir, "model_dir": arithmetic_model.model_dir}


# ---------------------------------------------------------------------------------------------- HF backend


def test_math_benchmark_numbers_come_from_hand_checkable_rewards(hf_run):
    record = hf_run["results"]["benchmarks"]["arith"]
    assert record["kind"] == "answer" and record["families"] == ["math"]
    assert record["rows_skipped"] == {"not_json": 1, "missing_field:answer": 1}
    assert record["problems_evaluated"] == len(MATH_SUMS) and record["prompts_dropped_too_long"] == 0
    rewards = [problem["rewards"] for problem in record["problems"]]
    assert_summary_matches(record["metrics"], rewards, n=N, k_list=K)
    assert 0.0 < record["metrics"]["avg"] < 1.0  # the warm-started model is right sometimes, not always
    samples = hf_run["samples"]["arith"]
    assert [s["rewards"] for s in samples] == rewards
    assert [gold_of(s["prompt"]) for s in samples] == [a + b for a, b in MATH_SUMS]
    assert assert_rewards_hand_checked(samples) >= len(MATH_SUMS) * N // 2  # mostly clean "#### n" answers
    assert sum(record["reasons"].values()) == len(MATH_SUMS) * N


def test_correction_benchmark_uses_the_trainer_template_and_splits_by_given_solution(hf_run, benchmark_files):
    record = hf_run["results"]["benchmarks"]["fix"]
    problems = record["problems"]
    assert record["kind"] == "correction" and record["rows_skipped"] == {"bad_solution": 1}
    assert [p["solution_correct"] for p in problems] == SOLUTION_CORRECT
    assert [p["solution_judged_by"] for p in problems] == JUDGED_BY
    assert record["given_solutions"] == {"correct": 2, "flawed": 2, "judged_by_label": 2, "judged_by_verifier": 2}
    rewards = [p["rewards"] for p in problems]
    metrics = record["metrics"]
    assert_summary_matches(metrics["all"], rewards, n=N, k_list=K)
    flawed = [r for r, correct in zip(rewards, SOLUTION_CORRECT) if not correct]
    kept = [r for r, correct in zip(rewards, SOLUTION_CORRECT) if correct]
    assert_summary_matches(metrics["correction_success"], flawed, n=N, k_list=K)  # wrong -> right
    assert_summary_matches(metrics["retention"], kept, n=N, k_list=K)  # right -> right
    # The prompt is the trainer's correction prompt, built with the config's template.
    cfg = load_config(BASE, OVERRIDES)
    tokenizer = AutoTokenizer.from_pretrained(hf_run["model_dir"])
    benchmark = load_benchmark(str(benchmark_files[1]))
    samples = hf_run["samples"]["fix"]
    for item, solution, sample in zip(benchmark.items, benchmark.attempts, samples, strict=True):
        text = build_correction_prompt(problem=problem_text(item, cfg.data.instructions), attempt=solution,
                                       family="math", templates=cfg.cipo.templates, tokenizer=tokenizer,
                                       attempt_max_tokens=32, strip_thinking=True)
        assert sample["prompt"] == render_chat(text, tokenizer=tokenizer, system_prompt=None)
        assert f"### Previous attempt\n{solution}\n" in sample["prompt"]
    assert_rewards_hand_checked(samples)


def test_humaneval_fails_through_the_sandbox_with_outcomes_recorded(hf_run):
    record = hf_run["results"]["benchmarks"]["humaneval"]
    tokenizer = AutoTokenizer.from_pretrained(hf_run["model_dir"])
    cfg = load_config(BASE, OVERRIDES)
    items = load_humaneval_benchmark().items[:HUMANEVAL_PROBLEMS]
    lengths = [len(tokenizer(render_prompt(item, tokenizer=tokenizer, instructions=cfg.data.instructions,
                                           system_prompt=None), add_special_tokens=False)["input_ids"])
               for item in items]
    too_long = sum(length > MAX_MODEL_LEN - MAX_NEW_TOKENS for length in lengths)
    assert record["prompts_dropped_too_long"] == too_long
    assert record["problems_evaluated"] == HUMANEVAL_PROBLEMS - too_long >= 2
    metrics = record["metrics"]
    assert metrics["avg"] == 0.0 and all(value == 0.0 for value in metrics["pass@k"].values())
    for problem in record["problems"]:
        assert problem["rewards"] == [0.0] * N and len(problem["reasons"]) == N
        assert set(problem["reasons"]) <= set(OUTCOMES) - {"passed", "sandbox_error"}  # the programs ran, and failed
    assert sum(record["reasons"].values()) == record["problems_evaluated"] * N


def test_cli_prints_the_table_and_writes_the_files(hf_run):
    results = hf_run["results"]
    arith = results["benchmarks"]["arith"]["metrics"]
    expected = " ".join(f"{value:.3f}" for value in [arith["avg"], *arith["pass@k"].values()])
    table = hf_run["stdout"].splitlines()
    assert table[0].split() == ["benchmark", "problems", "n", f"avg@{N}", "pass@1", "pass@2", "pass@4"]
    assert [line.split()[0] for line in table[2:8]] == ["arith", "fix", "fix", "fix", "fix", "humaneval"]
    assert table[3:7] == [line for line in table[3:7] if line.startswith("fix [")]  # all, w->r, r->r, balanced
    assert " ".join(table[2].split()[3:]) == expected
    # below a rule, the average of the two answer benchmarks (the correction benchmark is not averaged)
    humaneval = results["benchmarks"]["humaneval"]["metrics"]
    assert set(table[8]) == {"-"} and table[9].split()[0] == "average"
    assert results["average"]["avg"] == pytest.approx((arith["avg"] + humaneval["avg"]) / 2)
    assert table[9].split()[3] == f"{results['average']['avg']:.3f}"
    assert (results["n"], results["k"], results["generation"]["backend"]) == (N, K, "hf")
    assert results["max_model_len"] == MAX_MODEL_LEN
    png = (hf_run["output_dir"] / "pass_at_k.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert table[10:] == [f"{kind}: {hf_run['output_dir'] / name}" for kind, name in
                          (("results", "results.json"), ("samples", "samples.jsonl"), ("plot", "pass_at_k.png"),
                           ("log (with the libraries' messages)", "run.log"))]


# ---------------------------------------------------------------------------------------------- vLLM backend


def test_vllm_and_hf_give_the_same_greedy_evaluation(arithmetic_model, benchmark_files, tmp_path):
    runs = {}
    for backend in ("vllm", "hf"):
        cfg = load_config(BASE, [f"generation.backend={backend}", "generation.temperature=0", *OVERRIDES])
        output_dir = tmp_path / backend
        runs[backend] = evaluate(arithmetic_model.model_dir, [str(path) for path in benchmark_files], cfg=cfg, n=2,
                                 k_list=[1, 2], seed=3, output_dir=output_dir)
        runs[backend]["samples"] = read_samples(output_dir / "samples.jsonl")
    vllm, hf = runs["vllm"], runs["hf"]
    assert vllm["generation"]["backend"] == "vllm"
    for name in ("arith", "fix"):
        assert [s["responses"] for s in vllm["samples"][name]] == [s["responses"] for s in hf["samples"][name]]
        assert vllm["benchmarks"][name]["metrics"] == hf["benchmarks"][name]["metrics"]
    arith = vllm["benchmarks"]["arith"]
    rewards = [problem["rewards"] for problem in arith["problems"]]
    assert_summary_matches(arith["metrics"], rewards, n=2, k_list=[1, 2])
    assert all(problem[0] == problem[1] for problem in rewards)  # greedy: both samples are the same
    assert arith["metrics"]["avg"] == arith["metrics"]["pass@k"]["1"] == arith["metrics"]["pass@k"]["2"]
    assert_rewards_hand_checked(vllm["samples"]["arith"])


# ---------------------------------------------------------------------------------------------- SmolLM2


def test_smollm2_end_to_end_on_a_handful_of_problems(tmp_path):
    cfg = load_config(BASE, ["generation.backend=hf", "generation.max_new_tokens=32",
                             "policy.max_total_sequence_length=1024", "verifier.num_workers=1"])
    humaneval = load_humaneval_benchmark().head(1)
    results = evaluate(SMOLLM2_ID, ["reasoning_gym:basic_arithmetic:2", humaneval], cfg=cfg, n=2, k_list=[1, 2],
                       seed=0, output_dir=tmp_path)
    samples = read_samples(tmp_path / "samples.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(results["model"])
    gym = load_benchmark("reasoning_gym:basic_arithmetic:2")
    for name, items in (("reasoning_gym:basic_arithmetic", gym.items), ("humaneval", humaneval.items)):
        record = results["benchmarks"][name]
        rewards = [problem["rewards"] for problem in record["problems"]]
        assert record["problems_evaluated"] == len(items) and len(samples[name]) == len(items)
        assert_summary_matches(record["metrics"], rewards, n=2, k_list=[1, 2])
        for item, sample in zip(items, samples[name], strict=True):
            assert sample["prompt"] == render_prompt(item, tokenizer=tokenizer, instructions=cfg.data.instructions,
                                                     system_prompt=None)
            assert len(sample["responses"]) == 2 and all(response.strip() for response in sample["responses"])
    for item, sample in zip(gym.items, samples["reasoning_gym:basic_arithmetic"]):
        assert sample["rewards"] == [score_one(response, item.answer).reward for response in sample["responses"]]
    reasons = results["benchmarks"]["humaneval"]["problems"][0]["reasons"]
    assert len(reasons) == 2 and set(reasons) <= set(OUTCOMES) - {"sandbox_error"}
