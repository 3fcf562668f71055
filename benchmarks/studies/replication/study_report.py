"""The instruct-model study's report, rebuilt from the committed results directory alone.

Layout read (written by benchmarks/studies/study_instruct.py): `<results>/preregistration.md`, and per seed
`seed<N>/{start,grpo,cipo}/results.json` (the harness's results with per-problem rewards) and
`seed<N>/{grpo,cipo}/metrics.jsonl`. Units not finished yet are reported as missing, not guessed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.studies.replication.arms import DATA_ORDER_FILE, VAL0_FILE
from benchmarks.studies.replication.paired import PairedDifference, paired_difference, per_problem
from benchmarks.studies.replication.report import ARMS, validation_curve
from cipo_nemo.utils.logger import METRICS_FILE, read_metrics

PREREGISTRATION = """# Pre-registration (written {date}, before any unit of the study ran)

Arms: GRPO and CIPO from the same instruct checkpoint, same config, seed, data order, steps and batch shape.
Evaluated for every model (start, GRPO, CIPO), with the same sampling seed:
- held-out problems (the training generator, another seed): avg@n and pass@k for k up to n;
- the hard split (harder generator options): avg@n and pass@k;
- correction prompts quoting the start model's own held-out attempts (alternately a wrong and a right one):
  wrong->right (correction success) and right->right (retention).
Test: paired per-problem differences CIPO - GRPO, mean with a percentile bootstrap 95% interval over problems
(10,000 resamples). A claim holds when the interval lies above 0, is not held when it lies below 0, and is
not shown otherwise. Claims (docs/paper_reconstruction.md): 1. CIPO > GRPO in held-out avg@n at equal steps;
2. CIPO's gap at the largest pass@k on the hard split exceeds its gap at pass@1; 3. CIPO's wrong->right exceeds
GRPO's, and its right->right is not below (interval not below 0). Also compared at equal generated tokens.

Settings:

```json
{settings}
```
"""

UNITS = ("start", "grpo", "cipo")
FINDINGS_FILE = "findings.md"  # written by hand after the runs: what happened, what a bigger run would need


def load_seed(seed_dir: Path) -> dict[str, Any]:
    """The finished units' results and training metrics of one seed."""
    out: dict[str, Any] = {"seed": seed_dir.name, "results": {}, "metrics": {}, "val0": {}, "data_order": {}}
    for unit in UNITS:
        if (seed_dir / unit / "done.json").is_file():
            out["results"][unit] = json.loads((seed_dir / unit / "results.json").read_text())
        if (seed_dir / unit / METRICS_FILE).is_file():  # a resumed arm's repeated steps keep their latest record
            out["metrics"][unit] = read_metrics(seed_dir / unit)
        for key, name in (("val0", VAL0_FILE), ("data_order", DATA_ORDER_FILE)):
            if (seed_dir / unit / name).is_file():
                out[key][unit] = json.loads((seed_dir / unit / name).read_text())
    return out


def problems(results: dict[str, Any], benchmark: str, *, attempt_correct: bool | None = None) -> list[dict]:
    """The per-problem records of one benchmark; for the correction set, those whose quoted attempt was wrong
    (False) or right (True)."""
    records = results["benchmarks"][benchmark]["problems"]
    if attempt_correct is None:
        return records
    return [record for record in records if record["solution_correct"] == attempt_correct]


def statistics(k_max: int) -> dict[str, tuple[str, bool | None, str]]:
    """The pre-registered per-problem statistics: label -> (benchmark, quoted attempt right / wrong / any,
    statistic)."""
    return {
        "held-out avg@n": ("heldout", None, "avg"),
        f"held-out pass@{k_max}": ("heldout", None, f"pass@{k_max}"),
        "hard avg@n": ("hard", None, "avg"),
        "hard pass@1": ("hard", None, "pass@1"),
        f"hard pass@{k_max}": ("hard", None, f"pass@{k_max}"),
        "wrong->right": ("correction", False, "avg"),
        "right->right": ("correction", True, "avg"),
    }


def unit_means(results: dict[str, Any], k_max: int) -> dict[str, float | None]:
    """One model's mean over problems of every pre-registered statistic (None: no problem of that kind)."""
    out: dict[str, float | None] = {}
    for label, (bench, subset, statistic) in statistics(k_max).items():
        values = per_problem(problems(results, bench, attempt_correct=subset), statistic)
        out[label] = sum(values.values()) / len(values) if values else None
    return out


def comparisons(grpo: dict[str, Any], cipo: dict[str, Any], k_max: int) -> dict[str, PairedDifference | None]:
    """CIPO - GRPO per problem: mean and bootstrap interval, for every pre-registered statistic (None where the
    evaluations have no problem of that kind, e.g. no correction prompt fit the context)."""
    out: dict[str, PairedDifference | None] = {}
    for label, (bench, subset, statistic) in statistics(k_max).items():
        a = per_problem(problems(grpo, bench, attempt_correct=subset), statistic)
        b = per_problem(problems(cipo, bench, attempt_correct=subset), statistic)
        out[label] = paired_difference(a, b, statistic=statistic) if set(a) & set(b) else None
    return out


def verdicts(diff: dict[str, PairedDifference | None], k_max: int) -> list[tuple[str, str, str]]:
    """(claim, held / not held / not shown / not testable, evidence) by the pre-registered test."""
    top = f"hard pass@{k_max}"
    claims = [
        ("1. CIPO > GRPO, held-out avg@n, equal steps", ("held-out avg@n",)),
        (f"2. gap at hard pass@{k_max} > gap at pass@1", (top, "hard pass@1")),
        ("3. wrong->right up, right->right not down", ("wrong->right", "right->right")),
    ]
    rows = []
    for claim, needed in claims:
        missing = [label for label in needed if diff[label] is None]
        if missing:
            rows.append((claim, "not testable", f"no problems for {', '.join(missing)}"))
        elif claim.startswith("1."):
            d = diff["held-out avg@n"]
            rows.append((claim, _state(d.low > 0, d.high < 0), _fmt(d)))
        elif claim.startswith("2."):
            d, one = diff[top], diff["hard pass@1"]
            growth = d.difference - one.difference
            rows.append((claim, _state(d.low > 0 and growth > 0, d.high < 0),
                         f"{_fmt(d)}; pass@1 gap {one.difference:+.3f}"))
        else:
            fix, keep = diff["wrong->right"], diff["right->right"]
            rows.append((claim, _state(fix.low > 0 and keep.low > -1e-12, fix.high < 0 or keep.high < 0),
                         f"fix {_fmt(fix)}; keep {_fmt(keep)}"))
    return rows


def exploratory_correction(grpo: dict[str, Any], cipo: dict[str, Any]) -> list[str]:
    """Post-hoc readings of the correction set, printed apart from the verdicts and never turned into one: the
    difference over every correction prompt (wrong and right quoted attempts together), and how many problems
    carry each half's difference (a mean over many exact zeros rests on the few that are not)."""
    lines = ["Exploratory, post hoc (chosen after seeing seed 0's data; not pre-registered, no verdict): the "
             "correction prompts use the template CIPO trained on and GRPO never saw.", ""]
    subsets = (("all correction prompts", None), ("wrong->right", False), ("right->right", True))
    for label, subset in subsets:
        a = per_problem(problems(grpo, "correction", attempt_correct=subset), "avg")
        b = per_problem(problems(cipo, "correction", attempt_correct=subset), "avg")
        shared = sorted(set(a) & set(b))
        if not shared:
            lines.append(f"- {label}: no problems")
            continue
        up = sum(b[key] > a[key] for key in shared)
        down = sum(b[key] < a[key] for key in shared)
        lines.append(f"- {label}: {_fmt(paired_difference(a, b, statistic='avg'))}; CIPO - GRPO is non-zero on "
                     f"{up + down} of {len(shared)} problems ({up} up, {down} down), exactly 0 on the other "
                     f"{len(shared) - up - down}")
    return lines


def _state(held: bool, not_held: bool) -> str:
    return "held" if held else "not held" if not_held else "not shown"


def liveness(records: list[dict[str, Any]]) -> dict[str, float | None]:
    """How much of the CIPO machinery acted during training."""
    if not records:
        return {}
    steps = len(records)
    def mean_of(key: str) -> float | None:
        values = [r[key] for r in records if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    return {
        "steps": steps,
        "steps with a correction stream": sum(1 for r in records if r.get("cipo/correction_samples")) / steps,
        "correction groups with a non-zero advantage (mean share)": mean_of("cipo/correction_groups_live"),
        "rho at a bound (share of steps)": mean_of("cipo/rho_at_bound"),
        "anchors failed / successful / truncated (totals)": "{:.0f} / {:.0f} / {:.0f}".format(
            *(sum(r.get(f"cipo/anchors_{kind}") or 0 for r in records) for kind in ("failed", "successful",
                                                                                       "truncated"))),
    }


def equal_tokens(metrics: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Each arm's last validation at or below the smaller arm's total generated tokens."""
    totals = {arm: sum(r.get("tokens/generated") or 0 for r in records) for arm, records in metrics.items()}
    if set(totals) != {"grpo", "cipo"}:
        return ["(training metrics of both arms are needed)"]
    budget = min(totals.values())
    lines = ["Generated tokens: " + ", ".join(f"{arm} {total:,.0f}" for arm, total in totals.items())
             + f"; compared at {budget:,.0f}."]
    for arm, records in metrics.items():
        spent, last = 0.0, None
        for record in records:
            spent += record.get("tokens/generated") or 0
            if spent > budget:
                break
            if record.get("val/reward_mean") is not None:
                last = (record["step"], record["val/reward_mean"])
        lines.append(f"- {arm}: " + ("no validation within the budget" if last is None
                                     else f"val reward {last[1]:.3f} at step {last[0]}"))
    return lines


def write_report(results_dir: Path, report: Path) -> Path:
    """The report: the pre-registration, the findings written after the runs (`findings.md` in the results
    directory, when there is one), then per seed the tables, verdicts, curves and liveness from the results."""
    seeds = [load_seed(path) for path in sorted(results_dir.glob("seed*"))]
    lines = ["# CIPO vs GRPO from an instruct checkpoint", ""]
    prereg = results_dir / "preregistration.md"
    lines += [prereg.read_text().replace("# Pre-registration", "## Pre-registration", 1) if prereg.is_file()
              else "(no pre-registration found)", ""]
    findings = results_dir / FINDINGS_FILE
    if findings.is_file():
        lines += [findings.read_text().strip(), ""]
    report.parent.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        curves = report.with_name(f"{report.stem}_{seed['seed']}.png")
        lines += _seed_section(seed, curves if plot_arms(seed, curves) else None)
    report.write_text("\n".join(lines) + "\n")
    return report


def _seed_section(seed: dict[str, Any], curves: Path | None) -> list[str]:
    lines = [f"## {seed['seed']}", ""]
    missing = [unit for unit in UNITS if unit not in seed["results"]]
    if missing:
        lines += [f"Not finished yet: {', '.join(missing)}.", ""]
    if seed["results"]:
        lines += [*unit_table(seed["results"]), ""]
    if curves is not None:
        lines += [f"![validation and training reward per arm]({curves.name})", ""]
    if "grpo" not in seed["results"] or "cipo" not in seed["results"]:
        return lines
    grpo, cipo = seed["results"]["grpo"], seed["results"]["cipo"]
    k_max = max(grpo["k"])
    lines += [same_data_order(seed["data_order"]), ""]
    diff = comparisons(grpo, cipo, k_max)
    lines += ["| statistic (per problem) | problems | GRPO | CIPO | CIPO - GRPO | 95% interval |", "|---|---|---|---|---|---|"]
    lines += [f"| {label} | 0 | | | | |" if d is None else
              f"| {label} | {d.problems} | {d.mean_a:.3f} | {d.mean_b:.3f} | {d.difference:+.3f} | "
              f"[{d.low:+.3f}, {d.high:+.3f}] |" for label, d in diff.items()]
    lines += ["", "| claim | verdict | evidence |", "|---|---|---|"]
    lines += [f"| {claim} | {state} | {evidence} |" for claim, state, evidence in verdicts(diff, k_max)]
    lines += ["", *exploratory_correction(grpo, cipo)]
    lines += ["", "Equal generated tokens:", *equal_tokens(seed["metrics"]), "", "CIPO liveness:"]
    lines += [f"- {key}: {value:.3f}" if isinstance(value, float) else f"- {key}: {value}"
              for key, value in liveness(seed["metrics"].get("cipo", [])).items()]
    return [*lines, ""]


def _fmt(d: PairedDifference) -> str:
    return f"{d.difference:+.3f} [{d.low:+.3f}, {d.high:+.3f}] over {d.problems} problems"


def unit_table(results: dict[str, dict[str, Any]]) -> list[str]:
    """Every finished model's means, start included: did training move anything at all?"""
    k_max = max(max(unit["k"]) for unit in results.values())
    labels = list(statistics(k_max))
    lines = ["| model | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for unit in UNITS:
        if unit in results:
            means = unit_means(results[unit], k_max)
            lines.append(f"| {unit} | " + " | ".join("-" if means[label] is None else f"{means[label]:.3f}"
                                                     for label in labels) + " |")
    return lines


def same_data_order(data_order: dict[str, list[list[str]]]) -> str:
    """Whether both arms trained on the same prompts in the same order (from the recorded batches)."""
    if set(data_order) != {"grpo", "cipo"}:
        return "Data order: not recorded for both arms."
    grpo, cipo = data_order["grpo"], data_order["cipo"]
    shared = min(len(grpo), len(cipo))
    same = grpo[:shared] == cipo[:shared]
    return (f"Data order: the first {shared} batches {'are' if same else 'are NOT'} the same prompts in the same "
            f"order in both arms (recorded batches: GRPO {len(grpo)}, CIPO {len(cipo)}).")


def plot_arms(seed: dict[str, Any], path: Path) -> bool:
    """Validation reward per step and per generated token (from the shared step-0 validation), and the training
    base reward, for each arm with metrics; False (nothing drawn) when no arm has any."""
    arms = [arm for arm in ARMS if seed["metrics"].get(arm)]
    if not arms:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for arm in arms:
        records = seed["metrics"][arm]
        steps, spent, rewards = validation_curve({"records": records, "val0": seed["val0"].get(arm, {})},
                                                 key="val/reward_mean")
        if steps:
            axes[0].plot(steps, rewards, marker="o", markersize=3, label=arm)
            axes[1].plot(spent, rewards, marker="o", markersize=3, label=arm)
        base = [(r["step"], r["reward/base_mean"]) for r in records if r.get("reward/base_mean") is not None]
        if base:
            axes[2].plot(*zip(*base), linewidth=0.8, label=arm)
    for axis, title, xlabel in zip(axes, ("validation reward", "validation reward", "training reward (base stream)"),
                                   ("step", "generated tokens", "step")):
        axis.set_title(title)
        axis.set_xlabel(xlabel)
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True
