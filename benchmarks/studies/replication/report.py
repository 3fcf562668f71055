"""Aggregate the per-seed results into tables, verdicts on the paper's three claims, PNG plots and a Markdown report.

Input: one `SeedResult` dict per seed (written as seed<N>/summary.json by the driver), each holding the warm start's
and both arms' evaluation headlines and their training records. Spread is the sample standard deviation over seeds.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ARMS = ("grpo", "cipo")
MODELS = ("warm", "grpo", "cipo")
LABELS = {"warm": "warm start", "grpo": "GRPO", "cipo": "CIPO"}
COLORS = {"warm": "tab:gray", "grpo": "tab:blue", "cipo": "tab:red"}


# ---------------------------------------------------------------------------------------------- numbers


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values: Sequence[float], *, signed: bool = False) -> str:
    if not values:
        return "-"  # nothing measured (e.g. no right attempt to keep), which is not 0
    mean, std = mean_std(values)
    sign = "+" if signed else ""
    return f"{mean:{sign}.3f} ± {std:.3f}"


def cumulative_tokens(records: list[dict[str, Any]]) -> list[float]:
    return list(np.cumsum([r["tokens/generated"] for r in records]))


def validation_curve(arm: dict[str, Any], key: str = "val/pass@1") -> tuple[list[int], list[float], list[float]]:
    """(steps, cumulative generated tokens, values) at every validation, starting with step 0 (the warm start)
    when the arm validated it."""
    records = arm["records"]
    tokens = cumulative_tokens(records)
    start = arm["val0"].get(key)
    steps, xs, ys = ([0], [0.0], [start]) if start is not None else ([], [], [])
    for record, total in zip(records, tokens):
        if record.get(key) is not None:
            steps.append(record["step"])
            xs.append(total)
            ys.append(record[key])
    return steps, xs, ys


def at_equal_tokens(seed_result: dict[str, Any]) -> dict[str, float]:
    """Both arms' val pass@1 at the smaller arm's total generated tokens (linear between validations)."""
    budget = min(cumulative_tokens(seed_result[arm]["records"])[-1] for arm in ARMS)
    out = {"tokens": budget}
    for arm in ARMS:
        _, xs, ys = validation_curve(seed_result[arm])
        out[arm] = float(np.interp(budget, xs, ys))
        out[f"{arm}_step"] = float(np.interp(budget, cumulative_tokens(seed_result[arm]["records"]),
                                             [r["step"] for r in seed_result[arm]["records"]]))
    return out


def metric(eval_headline: dict[str, Any], name: str) -> float | None:
    """One number of an evaluation headline by short name."""
    bench, _, what = name.partition("/")
    entry = eval_headline[bench]
    if bench == "correction":
        return entry[what]["avg"]
    if what == "avg":
        return entry["avg"]
    return entry["pass@k"][what.removeprefix("pass@")]


def main_columns(k_max: int) -> tuple[tuple[str, str], ...]:
    """(metric name, column label) of the headline tables; k_max is the largest k evaluated (= n)."""
    return (
        ("heldout/avg", "held-out avg@n (= pass@1)"),
        (f"heldout/pass@{k_max}", f"held-out pass@{k_max}"),
        ("hard/avg", "hard avg@n"),
        (f"hard/pass@{k_max}", f"hard pass@{k_max}"),
        ("correction/correction_success", "correction wrong->right"),
        ("correction/retention", "correction right->right"),
    )


def column_values(seeds: list[dict[str, Any]], model: str, name: str) -> list[float]:
    values = [metric(s["eval"][model], name) for s in seeds]
    return [v for v in values if v is not None]


def differences(seeds: list[dict[str, Any]], name: str) -> list[float]:
    """CIPO - GRPO per seed (seeds where either is unmeasured are left out)."""
    pairs = [(metric(s["eval"]["cipo"], name), metric(s["eval"]["grpo"], name)) for s in seeds]
    return [c - g for c, g in pairs if c is not None and g is not None]


# ---------------------------------------------------------------------------------------------- verdicts


def verdict(diffs: Sequence[float]) -> str:
    """'held' only when CIPO is ahead on average and in every seed; 'not held' when it is not ahead on average."""
    if not diffs:
        return "not measured"
    mean = statistics.fmean(diffs)
    if mean > 0 and all(d > 0 for d in diffs):
        return "held"
    if mean <= 0:
        return "not held"
    return "mixed (ahead on average, not in every seed)"


def growth_verdict(gaps_at_1: Sequence[float], gaps_at_k: Sequence[float]) -> str:
    """Claim 2 needs CIPO ahead at large k *and* further ahead than at k=1; a deficit that shrinks as pass@k
    saturates is not an advantage that grows."""
    growth = [k - one for one, k in zip(gaps_at_1, gaps_at_k)]
    if not growth:
        return "not measured"
    if statistics.fmean(gaps_at_k) <= 0 or statistics.fmean(growth) <= 0:
        return "not held"
    if all(k > 0 and g > 0 for k, g in zip(gaps_at_k, growth)):
        return "held"
    return "mixed (ahead on average, not in every seed)"


def claim_verdicts(seeds: list[dict[str, Any]], k_max: int) -> list[dict[str, str]]:
    heldout, hard = differences(seeds, "heldout/avg"), differences(seeds, "hard/avg")
    at_k, at_k_hard = differences(seeds, f"heldout/pass@{k_max}"), differences(seeds, f"hard/pass@{k_max}")
    growth = [k - one for k, one in zip(at_k, heldout)]
    growth_hard = [k - one for k, one in zip(at_k_hard, hard)]
    fix, keep = differences(seeds, "correction/correction_success"), differences(seeds, "correction/retention")
    return [
        {"claim": "1. CIPO > GRPO at equal steps (held-out avg@n)", "verdict": verdict(heldout),
         "evidence": f"CIPO - GRPO: held-out {fmt(heldout, signed=True)}, hard {fmt(hard, signed=True)} "
                     f"(hard: {verdict(hard)})"},
        {"claim": f"2. CIPO's advantage grows with k (ahead at pass@{k_max}, by more than at pass@1)",
         "verdict": growth_verdict(heldout, at_k),
         "evidence": f"CIPO - GRPO at pass@{k_max}: held-out {fmt(at_k, signed=True)}, hard "
                     f"{fmt(at_k_hard, signed=True)}; minus the gap at pass@1: held-out {fmt(growth, signed=True)}, "
                     f"hard {fmt(growth_hard, signed=True)} (hard: {growth_verdict(hard, at_k_hard)})"},
        {"claim": "3. CIPO corrects better (wrong->right, without losing right->right)", "verdict": verdict(fix),
         "evidence": f"CIPO - GRPO: wrong->right {fmt(fix, signed=True)}, right->right {fmt(keep, signed=True)}"},
    ]


# ---------------------------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display where benchmarks run
    import matplotlib.pyplot as plt

    return plt


def plot_training(seeds: list[dict[str, Any]], path: Path) -> Path:
    """Base reward and val pass@1 against step and against cumulative generated tokens; thin lines per seed."""
    plt = _pyplot()
    figure, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for arm in ARMS:
        color = COLORS[arm]
        for index, s in enumerate(seeds):
            records = s[arm]["records"]
            label = LABELS[arm] if index == 0 else None
            steps = [r["step"] for r in records]
            rewards = _smooth([r["reward/base_mean"] for r in records])
            tokens = cumulative_tokens(records)
            val_steps, val_tokens, val = validation_curve(s[arm])
            axes[0][0].plot(steps, rewards, color=color, alpha=0.6, label=label)
            axes[1][0].plot(tokens, rewards, color=color, alpha=0.6, label=label)
            axes[0][1].plot(val_steps, val, color=color, alpha=0.6, marker="o", markersize=3, label=label)
            axes[1][1].plot(val_tokens, val, color=color, alpha=0.6, marker="o", markersize=3, label=label)
    titles = (("base-stream reward (moving mean of 5 steps)", "val pass@1"),) * 2
    for row, xlabel in enumerate(("step", "generated tokens (base + correction streams)")):
        for column in range(2):
            axis = axes[row][column]
            axis.set_title(titles[row][column])
            axis.set_xlabel(xlabel)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
    figure.suptitle(f"training curves, one line per seed ({len(seeds)} seeds)")
    return _save(figure, path)


def _smooth(values: list[float], window: int = 5) -> list[float]:
    out = []
    for index in range(len(values)):
        chunk = values[max(0, index - window + 1): index + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def plot_pass_at_k(seeds: list[dict[str, Any]], k_list: Sequence[int], path: Path) -> Path:
    """pass@k against k (log2), mean over seeds with the seed spread shaded, per answer benchmark."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, bench in zip(axes, ("heldout", "hard")):
        for model in MODELS:
            rows = np.array([[metric(s["eval"][model], f"{bench}/pass@{k}") for k in k_list] for s in seeds])
            mean, std = rows.mean(axis=0), rows.std(axis=0, ddof=1) if len(seeds) > 1 else np.zeros(len(k_list))
            axis.plot(k_list, mean, marker="o", markersize=4, color=COLORS[model], label=LABELS[model])
            axis.fill_between(k_list, mean - std, mean + std, color=COLORS[model], alpha=0.15)
        axis.set_xscale("log", base=2)
        axis.set_xticks(list(k_list), [str(k) for k in k_list])
        axis.set_ylim(-0.02, 1.02)
        axis.set_xlabel("k")
        axis.set_ylabel("pass@k")
        axis.set_title(f"{bench}: pass@k (mean ± std over {len(seeds)} seeds)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    return _save(figure, path)


def plot_correction(seeds: list[dict[str, Any]], path: Path) -> Path:
    """wrong->right and right->right rates per model: bars at the mean, dots per seed."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.2))
    subsets = (("correction/correction_success", "wrong->right"), ("correction/retention", "right->right"))
    width = 0.25
    for offset, model in enumerate(MODELS):
        for position, (name, _) in enumerate(subsets):
            values = column_values(seeds, model, name)
            if not values:
                continue
            x = position + (offset - 1) * width
            axis.bar(x, statistics.fmean(values), width=width * 0.9, color=COLORS[model],
                     label=LABELS[model] if position == 0 else None, alpha=0.8)
            axis.scatter([x] * len(values), values, color="black", s=10, zorder=3)
    axis.set_xticks(range(len(subsets)), [label for _, label in subsets])
    axis.set_ylim(0, 1.02)
    axis.set_ylabel("mean reward of corrections (avg@n)")
    axis.set_title("correcting the warm start's attempts (dots: seeds)")
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize=8)
    return _save(figure, path)


def _save(figure: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# ---------------------------------------------------------------------------------------------- markdown


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main_table(seeds: list[dict[str, Any]], k_max: int) -> str:
    columns = main_columns(k_max)
    rows = [[LABELS[model], *(fmt(column_values(seeds, model, name)) for name, _ in columns)] for model in MODELS]
    rows.append(["CIPO - GRPO", *(fmt(differences(seeds, name), signed=True) for name, _ in columns)])
    return table(["model", *(label for _, label in columns)], rows)


def per_seed_table(seeds: list[dict[str, Any]], k_max: int) -> str:
    columns = main_columns(k_max)
    rows = []
    for s in seeds:
        for model in MODELS:
            values = [metric(s["eval"][model], name) for name, _ in columns]
            rows.append([str(s["seed"]), LABELS[model], *("-" if v is None else f"{v:.3f}" for v in values)])
    return table(["seed", "model", *(label for _, label in columns)], rows)


def pass_at_k_table(seeds: list[dict[str, Any]], k_list: Sequence[int]) -> str:
    rows = []
    for k in k_list:
        row = [str(k)]
        for bench in ("heldout", "hard"):
            name = f"{bench}/pass@{k}"
            row += [fmt(column_values(seeds, "grpo", name)), fmt(column_values(seeds, "cipo", name)),
                    fmt(differences(seeds, name), signed=True)]
        rows.append(row)
    header = ["k", "held-out GRPO", "held-out CIPO", "held-out CIPO-GRPO", "hard GRPO", "hard CIPO", "hard CIPO-GRPO"]
    return table(header, rows)


def training_table(seeds: list[dict[str, Any]]) -> str:
    """Per seed: steps, data order identity, final val pass@1, and both arms at equal generated tokens."""
    rows = []
    for s in seeds:
        equal = at_equal_tokens(s)
        finals = [validation_curve(s[arm])[2][-1] for arm in ARMS]
        totals = [cumulative_tokens(s[arm]["records"])[-1] for arm in ARMS]
        rows.append([
            str(s["seed"]), " / ".join(str(len(s[arm]["records"])) for arm in ARMS),
            "yes" if s["same_data_order"] else "NO", f"{finals[0]:.3f} / {finals[1]:.3f}",
            f"{totals[0]:,.0f} / {totals[1]:,.0f}",
            f"{equal['tokens']:,.0f}", f"{equal['grpo']:.3f} (step {equal['grpo_step']:.0f})",
            f"{equal['cipo']:.3f} (step {equal['cipo_step']:.0f})",
            " / ".join(f"{s[arm]['seconds'] / 60:.1f}" for arm in ARMS),
        ])
    header = ["seed", "steps GRPO / CIPO", "same prompts in same order", "final val pass@1 GRPO / CIPO",
              "generated tokens GRPO / CIPO", "equal-token budget", "GRPO val pass@1 there", "CIPO val pass@1 there",
              "minutes GRPO / CIPO"]
    return table(header, rows)


def correction_table(seeds: list[dict[str, Any]]) -> str:
    """Correction rates next to what the same model scores on the same problems with no attempt shown."""
    rows = []
    for model in MODELS:
        plain = {key: [s["answer_rates"][model][key] for s in seeds if s["answer_rates"][model][key] is not None]
                 for key in ("flawed", "correct")}
        rows.append([LABELS[model], fmt(column_values(seeds, model, "correction/correction_success")),
                     fmt(plain["flawed"]), fmt(column_values(seeds, model, "correction/retention")),
                     fmt(plain["correct"])])
    header = ["model", "wrong->right", "plain accuracy, same problems", "right->right", "plain accuracy, same problems"]
    return table(header, rows)


def ablation_table(ablations: list[dict[str, Any]], k_max: int) -> str:
    columns = main_columns(k_max)
    rows = [[a["name"], a["override"], *(f"{metric(a['eval'], name):.3f}" if metric(a["eval"], name) is not None
                                          else "-" for name, _ in columns)] for a in ablations]
    return table(["variant", "override", *(label for _, label in columns)], rows)


# ---------------------------------------------------------------------------------------------- observations


def observations(seeds: list[dict[str, Any]]) -> list[str]:
    """Data-driven remarks that bear on the verdicts: how far RL moved at all, how healthy the correction stream
    was. Each seed carries its CIPO run's `cipo.rho` settings as "rho"; a remark is made only where the data say so."""
    tau, rho_max = seeds[0]["rho"]["tau"], seeds[0]["rho"]["max"]
    over_warm = {arm: [metric(s["eval"][arm], "heldout/avg") - metric(s["eval"]["warm"], "heldout/avg")
                       for s in seeds] for arm in ARMS}
    lines = [f"Held-out accuracy gained by RL over the warm start: GRPO {fmt(over_warm['grpo'], signed=True)}, "
             f"CIPO {fmt(over_warm['cipo'], signed=True)}; compare the CIPO - GRPO differences with these."]
    equal = [at_equal_tokens(s) for s in seeds]
    reached = statistics.fmean(e["cipo_step"] for e in equal)
    lines.append(f"At equal generated tokens (GRPO's total, which CIPO reaches at about step {reached:.0f} of "
                 f"{len(seeds[0]['cipo']['records'])}) the validation pass@1 "
                 f"difference CIPO - GRPO was {fmt([e['cipo'] - e['grpo'] for e in equal], signed=True)} (32 "
                 "problems x 8 samples per validation, so about ±0.03 of sampling noise on each value).")
    k_max = max(int(k) for k in seeds[0]["eval"]["grpo"]["heldout"]["pass@k"])
    ceiling = [metric(s["eval"][arm], f"heldout/pass@{k_max}") for s in seeds for arm in ARMS]
    if min(ceiling) >= 0.97:
        lines.append(f"Held-out pass@{k_max} is at the ceiling for both arms (at least {min(ceiling):.3f} in every "
                     "run), so it cannot show a gap growing with k; the hard set is the informative one for claim 2.")
    records = [r for s in seeds for r in s["cipo"]["records"]]
    retention = [r["cipo/retention"] for r in records if r["cipo/retention"] is not None]
    fixes = [r["cipo/correction_success"] for r in records if r["cipo/correction_success"] is not None]
    if retention and fixes:
        at_max = sum(r["cipo/rho"] >= rho_max - 1e-9 for r in records) / len(records)
        successful = (sum(r["cipo/anchors_successful"] for r in records)
                      / max(sum(r["cipo/anchors_total"] for r in records), 1))
        line = (f"During CIPO training the retention (right->right on the anchors) averaged "
                f"{statistics.fmean(retention):.2f} against the target tau = {tau}, and correction success "
                f"(wrong->right) {statistics.fmean(fixes):.2f}; rho was at its maximum {rho_max} in {at_max:.0%} of "
                f"the steps and {successful:.0%} of all anchors were right attempts")
        if successful > 0.5:
            line += ": the correction stream mostly trained 'keep a right answer'"
        lines.append(line + ".")
    plain = [s["answer_rates"]["warm"]["correct"] for s in seeds if s["answer_rates"]["warm"]["correct"] is not None]
    kept = column_values(seeds, "warm", "correction/retention")
    if plain and kept and statistics.fmean(kept) < statistics.fmean(plain):
        lines.append(
            f"The warm start keeps a right attempt in only {statistics.fmean(kept):.2f} of its corrections, while it "
            f"answers the same problems right {statistics.fmean(plain):.2f} of the time with no attempt shown: for "
            "this model the long correction prompt is harder than the problem itself, unlike for the paper's 4B-8B "
            "instruct models, so the correction stream starts from a weak skill.")
    return lines
