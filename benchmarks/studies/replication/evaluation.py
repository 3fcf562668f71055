"""Final evaluation with the project's harness (cipo_nemo.eval.harness.evaluate): held-out, hard, correction.

The correction set quotes the warm-start model's own attempts at the held-out problems (one per problem, taken
from its held-out evaluation samples), alternating a wrong and a right attempt where the model produced both, so
that wrong->right (correction success) and right->right (retention) are each measured on about half the problems.
The labels are the verifier's verdicts on those samples. Every model is evaluated with the same sampling seed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cipo_nemo.algorithms.rewards import SUCCESS_THRESHOLD
from cipo_nemo.config import MasterConfig
from cipo_nemo.eval.benchmarks import Benchmark
from cipo_nemo.eval.harness import evaluate
from cipo_nemo.eval.report import SAMPLES_FILE

from benchmarks.studies.replication.task import SumProblem
from benchmarks.studies.replication.warm_start import task_item

HELDOUT, HARD, CORRECTION = "heldout", "hard", "correction"


def answer_benchmark(name: str, problems: list[SumProblem]) -> Benchmark:
    return Benchmark(name=name, kind="answer", items=[task_item(p) for p in problems], source=f"replication:{name}")


def evaluate_model(model_dir: Path, benchmarks: list[Benchmark], cfg: MasterConfig, *, n: int, k_list: tuple[int, ...],
                   seed: int, output_dir: Path) -> dict[str, Any]:
    """results.json of the harness, also written (with samples.jsonl and pass_at_k.png) to `output_dir`."""
    return evaluate(model_dir, benchmarks, cfg=cfg, n=n, k_list=list(k_list), seed=seed, output_dir=output_dir)


def correction_benchmark(problems: list[SumProblem], warm_eval_dir: Path) -> Benchmark:
    """Warm-start attempts at `problems` (from its held-out samples), alternating wrong and right ones."""
    samples = {record["id"]: record for record in map(json.loads, (warm_eval_dir / SAMPLES_FILE).open())
               if record["benchmark"] == HELDOUT}
    items, attempts, labels = [], [], []
    for index, problem in enumerate(problems):
        record = samples[problem.id]
        correct = [reward > SUCCESS_THRESHOLD for reward in record["rewards"]]
        want_correct = index % 2 == 1
        chosen = correct.index(want_correct) if want_correct in correct else 0
        items.append(task_item(problem))
        attempts.append(record["responses"][chosen])
        labels.append(correct[chosen])
    return Benchmark(name=CORRECTION, kind="correction", items=items, source="warm-start attempts at heldout",
                     attempts=attempts, attempt_correct=labels)


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The numbers the report uses: avg and pass@k per answer benchmark, rates per correction subset."""
    out: dict[str, Any] = {}
    for name, record in results["benchmarks"].items():
        metrics = record["metrics"]
        if record["kind"] == "answer":
            out[name] = {"avg": metrics["avg"], "pass@k": metrics["pass@k"]}
        else:
            out[name] = {subset: {"avg": metrics[subset]["avg"], "problems": metrics[subset]["problems"],
                                  "pass@k": metrics[subset]["pass@k"]}
                         for subset in ("all", "correction_success", "retention")}
    return out


def answer_rate_by_attempt(answer_results: dict[str, Any], correction_results: dict[str, Any]) -> dict[str, float]:
    """The model's plain held-out accuracy (no attempt shown) on the problems whose quoted attempt was wrong, and
    on those whose attempt was right: what wrong->right and right->right would be if the model ignored the attempt
    and solved the problem afresh. Correction beyond this is use of the attempt."""
    accuracy = {p["id"]: sum(p["rewards"]) / len(p["rewards"])
                for p in answer_results["benchmarks"][HELDOUT]["problems"]}
    out = {}
    for key, wanted in (("flawed", False), ("correct", True)):
        rates = [accuracy[p["id"]] for p in correction_results["benchmarks"][CORRECTION]["problems"]
                 if p["solution_correct"] == wanted]
        out[key] = sum(rates) / len(rates) if rates else None
    return out


def saved_answer_rates(seed_eval_dir: Path) -> dict[str, dict[str, float]]:
    """answer_rate_by_attempt for the warm start and both arms, from the evaluations saved under seed<N>/eval."""
    read = lambda name: json.loads((seed_eval_dir / name / "results.json").read_text())  # noqa: E731
    rates = {"warm": answer_rate_by_attempt(read("warm"), read("warm_correction"))}
    for arm in ("grpo", "cipo"):
        results = read(arm)
        rates[arm] = answer_rate_by_attempt(results, results)
    return rates
