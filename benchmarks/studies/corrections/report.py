"""The corrections study's report, rebuilt from the committed results directory alone.

It renders what analysis.py computes (the registered analysis) on the units that registration.py's check accepts
(git shows that the registration came first); a refused unit is named and left out, units not finished yet are
reported as missing, never guessed.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

from benchmarks.studies.corrections import analysis
from benchmarks.studies.corrections.analysis import MEASURE_LABELS, Comparison
from benchmarks.studies.corrections.design import ARMS, MODELS, Design
from benchmarks.studies.corrections.registration import (
    DONE_FILE,
    PrecedenceCheck,
    check_precedence,
    load_registration,
)
from benchmarks.studies.corrections.units import CORRECTION_SET_FILE, EVAL_KINDS, TRAIN_DIR
from benchmarks.studies.replication.arms import VAL0_FILE
from benchmarks.studies.replication.report import validation_curve
from cipo_nemo.utils.logger import METRICS_FILE, read_metrics

FINDINGS_FILE = "findings.md"  # written by hand after the runs
FINDINGS_PLACEHOLDER = """## Findings

**Placeholder: not written yet.** The findings are written by hand after the runs, from the verdicts below and
nothing else: what was shown and what was not, per claim, with its interval; what the frozen-anchor arm says about
learning from one's own failures versus practising the template; and what a GPU study would need to test the
paper's claims (model, task, scale, and cost in GPU-hours). Until then this page shows the registration and
whatever units have finished."""
TABLE_MEASURES = ("heldout", "plain", "fix_T", "keep_T", "bal_T", "fix_N", "keep_N", "bal_N")
SHORT = {"heldout": "held-out", "plain": "plain (corr. problems)", "fix_T": "w->r T", "keep_T": "r->r T",
         "bal_T": "balanced T", "fix_N": "w->r N", "keep_N": "r->r N", "bal_N": "balanced N",
         "anchor_fix_T": "w->r T - plain", "anchor_keep_T": "r->r T - plain"}


# ---------------------------------------------------------------------------------------------- loading


def load_seed(seed_dir: Path, refused: Collection[str] = ()) -> dict[str, Any]:
    """A seed's finished evaluations (model -> part -> results.json), correction problems and training records,
    without the `refused` units (names relative to the results directory: seed0/cipo/trained) and the training
    records of an arm with a refused training part."""
    out: dict[str, Any] = {"name": seed_dir.name, "parts": {}, "metrics": {}, "val0": {}, "done": {},
                           "correction_ids": []}
    if (seed_dir / CORRECTION_SET_FILE).is_file():
        out["correction_ids"] = [entry["id"] for entry in json.loads((seed_dir / CORRECTION_SET_FILE).read_text())]
    for model in MODELS:
        for kind in EVAL_KINDS:
            unit = seed_dir / model / kind
            if (unit / DONE_FILE).is_file() and f"{seed_dir.name}/{model}/{kind}" not in refused:
                out["parts"].setdefault(model, {})[kind] = json.loads((unit / "results.json").read_text())
        train = seed_dir / model / TRAIN_DIR
        training_refused = any(name.startswith(f"{seed_dir.name}/{model}/train") for name in refused)
        if (train / METRICS_FILE).is_file() and not training_refused:
            out["metrics"][model] = read_metrics(train)
        if (train / VAL0_FILE).is_file() and not training_refused:
            out["val0"][model] = json.loads((train / VAL0_FILE).read_text())
        for done in sorted((seed_dir / model).glob(f"*/{DONE_FILE}")):
            if f"{seed_dir.name}/{model}/{done.parent.name}" not in refused:
                out["done"][f"{model}/{done.parent.name}"] = json.loads(done.read_text())
    return out


def study_measures(seeds: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """seed name -> model -> measure -> problem -> value."""
    return {seed["name"]: {model: analysis.model_measures(parts, seed["correction_ids"])
                           for model, parts in seed["parts"].items()} for seed in seeds}


# ---------------------------------------------------------------------------------------------- writing


def write_report(results_dir: Path, report: Path) -> Path:
    """The report of the units that git shows to follow the registration (check_precedence); the others are named
    and left out."""
    registration = load_registration(results_dir)
    precedence = check_precedence(results_dir, registration)
    seeds = [load_seed(path, precedence.refused) for path in sorted(results_dir.glob("seed*")) if path.is_dir()]
    measures = study_measures(seeds)
    lines = ["# Correction after CIPO, GRPO and frozen-anchor CIPO: several seeds, a reworded template", ""]
    lines += intro(registration, seeds)
    lines += registration_section(registration, precedence)
    findings = results_dir / FINDINGS_FILE
    lines += [findings.read_text().strip() if findings.is_file() else FINDINGS_PLACEHOLDER, ""]
    lines += verdict_section(measures)
    lines += secondary_section(measures)
    report.parent.mkdir(parents=True, exist_ok=True)
    curves = report.with_name(f"{report.stem}_curves.png")
    if plot_curves(seeds, curves):
        lines += ["## Curves per arm and seed", "",
                  f"![validation and training curves per arm and seed]({curves.name})", ""]
    for seed in seeds:
        lines += seed_section(seed, measures.get(seed["name"], {}))
    report.write_text("\n".join(lines).rstrip() + "\n")
    return report


def intro(registration: dict[str, Any] | None, seeds: list[dict[str, Any]]) -> list[str]:
    if registration is None:
        return ["(no registration found: nothing below can be read as a test)", ""]
    design = Design.from_dict(registration["design"])
    done = sum(len(seed["done"]) for seed in seeds)
    return [
        f"Three arms from one format-warmed start ({design.config}): GRPO, CIPO, and CIPO whose correction prompts "
        f"quote frozen start-model attempts (`cipo.anchor_source: frozen_start`); {design.steps} steps each, "
        f"{len(design.seeds)} training seeds ({', '.join(map(str, design.seeds))}). Every model is evaluated on "
        f"{design.pool_problems} held-out problems per seed and on {design.correction_problems} correction problems "
        f"per seed (the start model made both a wrong and a right attempt at each; each quoted once in each role), "
        f"on the trained template and on a reworded one no arm trained on, {design.eval_samples} samples each. "
        f"Generated by `benchmarks/studies/study_corrections.py --report` from the results directory; {done} "
        "per-seed units finished and accepted so far.", ""]


def registration_section(registration: dict[str, Any] | None, precedence: PrecedenceCheck) -> list[str]:
    lines = ["## Registration", ""]
    if registration is None:
        return [*lines, "No registration.json.", ""]
    lines += [f"Written {registration['written']}; the file is `registration.json` in the results directory.", ""]
    lines += precedence.lines() + [""]
    lines += ["| claim | comparison | measures | kind |", "|---|---|---|---|"]
    lines += [f"| {c['key']}. {c['statement']} | {c['comparison']} | {', '.join(c['measures'])} | {c['kind']} "
              f"(threshold {c['threshold']:+.2f}) |" for c in registration["claims"]]
    lines += ["", f"Verdict rules: {registration['verdict_rules']}", "",
              "Measures: " + "; ".join(f"{key}: {label}" for key, label in registration["measures"].items()) + ".", "",
              "Secondary (interval and direction, no claim): "
              + ", ".join(f"{s['measure']} {s['comparison']}" for s in registration["secondary"]) + ".", ""]
    lines += power_lines(registration.get("power", {}))
    design = dict(registration["design"])
    template = design.pop("reworded_template")
    lines += ["Design (registered settings):", "", "```json", json.dumps(design, indent=1), "```", "",
              "Reworded correction template (no arm trained on it):", "", "```", template, "```", "",
              "Config sha256 (resolved config without run names, seed, part and the attempts' path): "
              + ", ".join(f"{name} `{value[:16]}`" for name, value in registration["config_sha256"].items())
              + "; analysis module blob: " + ", ".join(f"{name} `{value[:12]}`" for name, value in
                                                       registration["analysis_blob_sha1"].items()) + ".", ""]
    return lines


def power_lines(power: dict[str, Any]) -> list[str]:
    if not power:
        return []
    lines = ["Power (registered before the runs; " + power["basis"] + "):", "",
             "| measure | per-problem SD at n | problems per seed | seeds | seed SD | SE | interval SE | detectable "
             "at 80% | planned effect | power | size | power, simulated | size, simulated |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in power["rows"]:
        simulated, size = ("-" if row.get(key) is None else f"{row[key]:.3f}"
                           for key in ("simulated_power", "simulated_size"))
        lines.append(f"| {row['measure']} | {row['sd']:.3f} | {row['problems']} | {row['seeds']} "
                     f"| {row['seed_sd']:.2f} "
                     f"| {row['se']:.4f} | {row['interval_se']:.4f} | {row['detectable']:.3f} | {row['effect']:+.3f} "
                     f"({row['effect_source']}) | {row['power']:.2f} | {row['size']:.3f} | {simulated} | {size} |")
    return [*lines, "", *power.get("notes", []), ""]


def verdict_section(measures: dict[str, Any]) -> list[str]:
    lines = ["## Verdicts as registered", "",
             "| claim | comparison | pooled difference [95% interval] per measure | sign test per measure | verdict |",
             "|---|---|---|---|---|"]
    results = analysis.evaluate_claims(measures)
    for result in results:
        claim = result.claim
        intervals = "; ".join(f"{c.measure} " + (c.pooled.text() if c.pooled else "waiting")
                              for c in result.comparisons)
        signs = "; ".join(f"{c.measure} " + (c.signs.text() if c.signs else "-") for c in result.comparisons)
        lines.append(f"| {claim.key}. {claim.statement} | {claim.b} - {claim.a} | {intervals} | {signs} | "
                     f"**{result.verdict}** |")
    seeds = sorted({seed for result in results for seed in result.per_seed})
    if seeds:
        lines += ["", "Per seed (one-level bootstrap over that seed's problems; beside the pooled verdicts, not "
                  "instead of them):", "", "| claim | " + " | ".join(seeds) + " |", "|---" * (len(seeds) + 1) + "|"]
        for result in results:
            cells = []
            for seed in seeds:
                if seed not in result.per_seed:
                    cells.append("-")
                    continue
                detail = ", ".join(c.per_seed[seed].text() for c in result.comparisons)
                cells.append(f"{result.per_seed[seed]}: {detail}")
            lines.append(f"| {result.claim.key} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def secondary_section(measures: dict[str, Any]) -> list[str]:
    lines = ["## Secondary comparisons (pooled over seeds; no claim)", "",
             "| comparison | measure | pooled difference [95% interval] | reading | sign test | per seed |",
             "|---|---|---|---|---|---|"]
    for comparison in analysis.evaluate_secondary(measures):
        lines.append(_comparison_row(comparison))
    return [*lines, ""]


def _comparison_row(c: Comparison) -> str:
    pooled = c.pooled.text() if c.pooled else "waiting"
    reading = analysis.direction(c.pooled).replace("B", c.b).replace("A", c.a) if c.pooled else "-"
    per_seed = "; ".join(f"{seed} {interval.text()}" for seed, interval in c.per_seed.items()) or "-"
    return (f"| {c.b} - {c.a} | {MEASURE_LABELS[c.measure]} | {pooled} | {reading} | "
            f"{c.signs.text() if c.signs else '-'} | {per_seed} |")


def seed_section(seed: dict[str, Any], measures: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    lines = [f"## {seed['name']}", ""]
    if not seed["done"]:
        return [*lines, "No unit finished yet.", ""]
    lines += ["Units finished: " + ", ".join(f"{unit} ({record['seconds'] / 60:.0f} min)"
                                             for unit, record in sorted(seed["done"].items())) + ".", ""]
    if measures:
        lines += ["Means over problems (avg@n; T: trained template, N: reworded):", "",
                  "| model | " + " | ".join(SHORT[m] for m in TABLE_MEASURES) + " |",
                  "|---" * (len(TABLE_MEASURES) + 1) + "|"]
        for model in MODELS:
            if model in measures:
                values = measures[model]
                lines.append(f"| {model} | " + " | ".join(
                    f"{sum(values[m].values()) / len(values[m]):.3f}" if values.get(m) else "-"
                    for m in TABLE_MEASURES) + " |")
        lines.append("")
    lines += training_lines(seed)
    return lines


def training_lines(seed: dict[str, Any]) -> list[str]:
    """Per arm: steps, median step time, generated tokens, and how much of the correction stream acted."""
    rows = []
    for arm in ARMS:
        records = seed["metrics"].get(arm)
        if not records:
            continue
        times = sorted(r["timing/step"] for r in records if r.get("timing/step") is not None)
        def total(key: str) -> float:
            return sum(r.get(key) or 0 for r in records)
        live = [r["cipo/correction_groups_live"] for r in records if r.get("cipo/correction_groups_live") is not None]
        rows.append(f"| {arm} | {records[-1]['step']} | {times[len(times) // 2]:.1f} | "
                    f"{total('tokens/generated'):,.0f} | "
                    f"{total('cipo/anchors_failed'):.0f} / {total('cipo/anchors_successful'):.0f} | "
                    f"{total('cipo/anchors_dropped_too_long'):.0f} | "
                    + (f"{sum(live) / len(live):.3f}" if live else "-") + " |")
    if not rows:
        return []
    return ["| arm | steps | median s/step | tokens generated | anchors failed / successful | anchors dropped (too "
            "long; frozen: also no start attempt of the verdict) | correction groups with gradient (mean share) |",
            "|---|---|---|---|---|---|---|", *rows, ""]


def plot_curves(seeds: list[dict[str, Any]], path: Path) -> bool:
    """Per seed (rows): validation reward per step, training base reward, correction success on failed anchors, for
    every arm with metrics; False when no arm has any."""
    rows = [seed for seed in seeds if seed["metrics"]]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(rows), 3, figsize=(14, 3.2 * len(rows)), squeeze=False)
    for row, seed in zip(axes, rows):
        for arm in ARMS:
            records = seed["metrics"].get(arm)
            if not records:
                continue
            steps, _, rewards = validation_curve({"records": records, "val0": seed["val0"].get(arm, {})},
                                                 key="val/reward_mean")
            if steps:
                row[0].plot(steps, rewards, marker="o", markersize=3, label=arm)
            for axis, key in ((row[1], "reward/base_mean"), (row[2], "cipo/correction_success")):
                points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
                if points:
                    axis.plot(*zip(*points), linewidth=0.8, label=arm)
        for axis, title in zip(row, ("validation reward", "training reward (base stream)",
                                     "training wrong->right (correction stream)")):
            axis.set_title(f"{seed['name']}: {title}", fontsize=9)
            axis.set_xlabel("step")
            axis.grid(alpha=0.3)
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return True


