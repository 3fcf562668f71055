"""Aggregation and output of an evaluation: per-benchmark numbers, the console table, the JSON, the pass@k PNG.

Every summary carries the numbers it was computed from: ``problems`` (how many problems), ``n`` (samples per
problem) and ``samples``, next to ``avg`` (avg@n: the mean reward over all samples, i.e. the mean over problems of
each problem's mean over its n samples) and ``pass@k`` (the unbiased estimator averaged over problems, with c =
the samples whose reward exceeds the success threshold, as in training). A summary of zero problems has ``avg``
and every pass@k None: nothing was measured, which is not the same as 0.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cipo_nemo.algorithms.rewards import SUCCESS_THRESHOLD
from cipo_nemo.eval.passk import mean_pass_at_k

RESULTS_FILE = "results.json"
AVERAGE_ROW = "average"
SAMPLES_FILE = "samples.jsonl"
PLOT_FILE = "pass_at_k.png"
# Correction benchmarks: (key in the metrics, label in the table and plot).
CORRECTION_SUBSETS = (
    ("all", "all"),
    ("correction_success", "wrong->right"),
    ("retention", "right->right"),
    ("balanced", "balanced"),
)


# ---------------------------------------------------------------------------------------------- aggregation


def num_correct(rewards: Sequence[float]) -> int:
    """Samples counted as correct: reward > SUCCESS_THRESHOLD (the trainer's rule)."""
    return sum(1 for reward in rewards if reward > SUCCESS_THRESHOLD)


def summarize(rewards: Sequence[Sequence[float]], *, n: int, k_list: Sequence[int]) -> dict[str, Any]:
    """avg@n and pass@k over problems; ``rewards[p]`` holds the n rewards of problem p."""
    wrong_sizes = sorted({len(problem) for problem in rewards if len(problem) != n})
    if wrong_sizes:
        raise ValueError(f"every problem needs n={n} rewards; got problems with {wrong_sizes}")
    too_large = [k for k in k_list if k > n]
    if too_large:
        raise ValueError(f"k={too_large[0]} is larger than the number of samples n={n}")
    summary: dict[str, Any] = {"problems": len(rewards), "n": n, "samples": len(rewards) * n}
    if not rewards:
        return summary | {"avg": None, "pass@k": {str(k): None for k in k_list}}
    total = sum(sum(problem) for problem in rewards)
    counts = [(n, num_correct(problem)) for problem in rewards]
    summary["avg"] = total / (len(rewards) * n)
    summary["pass@k"] = {str(k): mean_pass_at_k(counts, k) for k in k_list}
    return summary


def summarize_correction(
    rewards: Sequence[Sequence[float]], attempt_correct: Sequence[bool], *, n: int, k_list: Sequence[int]
) -> dict[str, dict[str, Any]]:
    """Corrections of all problems, of flawed given solutions (correction success, wrong -> right) and of
    correct ones (retention, right -> right), each summarized with its own problem count."""
    if len(rewards) != len(attempt_correct):
        raise ValueError(f"{len(rewards)} problems but {len(attempt_correct)} attempt labels")
    flawed = [problem for problem, correct in zip(rewards, attempt_correct) if not correct]
    kept = [problem for problem, correct in zip(rewards, attempt_correct) if correct]
    correction_success = summarize(flawed, n=n, k_list=k_list)
    retention = summarize(kept, n=n, k_list=k_list)
    return {
        "all": summarize(rewards, n=n, k_list=k_list),
        "correction_success": correction_success,
        "retention": retention,
        "balanced": balanced_summary(correction_success, retention, k_list=k_list),
    }


def balanced_summary(correction_success: Mapping[str, Any], retention: Mapping[str, Any], *,
                     k_list: Sequence[int]) -> dict[str, Any]:
    """(wrong->right + right->right) / 2, for avg@n and each pass@k: a set with few flawed attempts cannot score
    high by keeping right answers alone. None (not measured) unless both kinds of given solution are present."""
    if correction_success["problems"] and retention["problems"]:
        return average_summary([correction_success, retention], k_list=k_list)
    return {"benchmarks": 0, "problems": correction_success["problems"] + retention["problems"],
            "n": correction_success["n"], "samples": correction_success["samples"] + retention["samples"],
            "avg": None, "pass@k": {str(k): None for k in k_list}}


def average_summary(summaries: Sequence[Mapping[str, Any]], *, k_list: Sequence[int]) -> dict[str, Any]:
    """The paper's average column: the mean over benchmarks of avg@n and of each pass@k, each benchmark counting
    once whatever its size; a benchmark with no problem evaluated is left out (``benchmarks`` says how many
    count). One summary averages to its own numbers."""
    measured = [summary for summary in summaries if summary["problems"]]
    average: dict[str, Any] = {"benchmarks": len(measured), "problems": sum(s["problems"] for s in measured),
                               "n": summaries[0]["n"] if summaries else None,
                               "samples": sum(s["samples"] for s in measured)}
    if not measured:
        return average | {"avg": None, "pass@k": {str(k): None for k in k_list}}
    # avg = (1 / B) * sum_b avg_b, pass@k = (1 / B) * sum_b pass@k_b
    average["avg"] = sum(s["avg"] for s in measured) / len(measured)
    average["pass@k"] = {str(k): sum(s["pass@k"][str(k)] for s in measured) / len(measured) for k in k_list}
    return average


# ---------------------------------------------------------------------------------------------- table


def summary_rows(results: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, summary) per line of the table and per curve of the plot; the average over the answer benchmarks
    last, when there are two or more."""
    rows = []
    for name, benchmark in results["benchmarks"].items():
        if benchmark["kind"] == "answer":
            rows.append((name, benchmark["metrics"]))
        else:
            rows += [(f"{name} [{label}]", benchmark["metrics"][key]) for key, label in CORRECTION_SUBSETS]
    if results.get("average") is not None:
        rows.append((AVERAGE_ROW, results["average"]))
    return rows


def answer_average(results: Mapping[str, Any]) -> dict[str, Any] | None:
    """The average row over the answer benchmarks of `results` (None with fewer than two)."""
    answers = [record["metrics"] for record in results["benchmarks"].values() if record["kind"] == "answer"]
    return average_summary(answers, k_list=results["k"]) if len(answers) >= 2 else None


def format_table(results: Mapping[str, Any]) -> str:
    """The console table: one line per answer benchmark, three per correction benchmark, and below a rule the
    average over the answer benchmarks (when there are two or more), as the paper's tables have it."""
    k_list = results["k"]
    header = ["benchmark", "problems", "n", f"avg@{results['n']}", *(f"pass@{k}" for k in k_list)]
    lines = [header]
    for label, summary in summary_rows(results):
        values = [summary["avg"], *(summary["pass@k"][str(k)] for k in k_list)]
        lines.append([label, str(summary["problems"]), str(summary["n"]), *(_format_rate(v) for v in values)])
        if label == AVERAGE_ROW:
            lines.insert(len(lines) - 1, [])  # a rule above the average
    widths = [max(len(line[column]) for line in lines if line) for column in range(len(header))]
    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    formatted = [
        "  ".join(cell.ljust(widths[0]) if column == 0 else cell.rjust(widths[column])
                  for column, cell in enumerate(line)) if line else rule
        for line in lines
    ]
    formatted.insert(1, rule)
    return "\n".join(formatted)


def _format_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


# ---------------------------------------------------------------------------------------------- files


def write_results(
    results: Mapping[str, Any], samples: Sequence[Mapping[str, Any]], output_dir: Path
) -> dict[str, Path]:
    """results.json (every number), samples.jsonl (one line per problem: prompt, responses, rewards) and the
    pass@k PNG, in `output_dir` (created if needed). Returns the paths by kind."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"results": output_dir / RESULTS_FILE, "samples": output_dir / SAMPLES_FILE, "plot": output_dir / PLOT_FILE}
    paths["results"].write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    with paths["samples"].open("w", encoding="utf-8") as handle:
        for record in samples:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    write_pass_at_k_plot(results, paths["plot"])
    return paths


def build_pass_at_k_figure(results: Mapping[str, Any]) -> Any:
    """A matplotlib figure: pass@k against k (log2 axis), one line per table row that measured something."""
    import matplotlib

    matplotlib.use("Agg")  # no display where evaluations run
    import matplotlib.pyplot as plt

    k_list = results["k"]
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for label, summary in summary_rows(results):
        if summary["avg"] is None:
            continue  # nothing measured: no line rather than a line at 0
        values = [summary["pass@k"][str(k)] for k in k_list]
        axis.plot(k_list, values, marker="o", markersize=4, label=f"{label} ({summary['problems']} problems)")
    axis.set_xscale("log", base=2)
    axis.set_xticks(k_list, [str(k) for k in k_list])
    axis.set_ylim(-0.02, 1.02)
    axis.set_xlabel("k (samples)")
    axis.set_ylabel("pass@k")
    axis.set_title(f"pass@k, n = {results['n']} samples per problem")
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def write_pass_at_k_plot(results: Mapping[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure = build_pass_at_k_figure(results)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
