"""Does our CIPO do what the paper says? A controlled CIPO-vs-GRPO replication at small scale, on 2 CPU cores.

Per seed: build a tiny Llama and a BPE from the task text, warm-start it on procedural multi-step sums (shared by
both arms), train GRPO (`cipo.enabled=false`) and CIPO from it through the real loop (cipo_nemo.trainer
setup/train/shutdown, HF backends) with identical seeds, data order, batch sizes and hyperparameters, and evaluate
the warm start and both final policies with cipo_nemo.eval (held-out and harder sums: avg@n, pass@k up to n;
correction of the warm start's own attempts: wrong->right, right->right). Then aggregate over seeds and write the
report (Markdown + PNGs) with verdicts on the paper's three claims (docs/results/cipo_vs_grpo.md).

    python benchmarks/studies/replicate_cipo_vs_grpo.py                    # full: 3 seeds, about 40 minutes on 2 cores
    python benchmarks/studies/replicate_cipo_vs_grpo.py --quick --output-dir /tmp/rep --report /tmp/rep/report.md
    python benchmarks/studies/replicate_cipo_vs_grpo.py --report-only      # rebuild the report from --output-dir
    python benchmarks/studies/replicate_cipo_vs_grpo.py --ablations    # + one-change-at-a-time CIPO variants (seed 0)
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
from collections import Counter
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

import torch  # noqa: E402
import yaml  # noqa: E402

from benchmarks.studies.replication import report as rep  # noqa: E402
from benchmarks.studies.replication.arms import run_arm  # noqa: E402
from benchmarks.studies.replication.evaluation import (  # noqa: E402
    HARD, HELDOUT, answer_benchmark, correction_benchmark, evaluate_model, headline, saved_answer_rates)
from benchmarks.studies.replication.settings import (  # noqa: E402
    FULL, PASS_K, QUICK, Sizes, arm_config, shared_overrides)
from benchmarks.studies.replication.task import (  # noqa: E402
    HARD_SPEC, TRAIN_SPEC, SumProblem, generate_problems, write_jsonl)
from benchmarks.studies.replication.warm_start import build_warm_start  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DATA_SEED = 1234  # the problem sets are the same for every seed; seeds change model, warm start and RL sampling
SUMMARY_FILE = "summary.json"
RUN_INFO_FILE = "run_info.json"  # the training run's command and wall time, for --report-only
# One change at a time from the CIPO config (run on the first seed, compared with its CIPO and GRPO arms).
ABLATIONS = (
    ("lambda_c=0.5", "cipo.loss_weight=0.5"),
    ("no risk penalty", "cipo.risk_penalty=0.0"),
    ("advantage mode anchor", "cipo.advantage_mode=anchor"),
    ("advantage mode group", "cipo.advantage_mode=group"),
    ("rho fixed at 0.3", "cipo.rho.min=0.3,cipo.rho.max=0.3"),
    ("no difficulty window", "cipo.difficulty_low=0.0,cipo.difficulty_high=1.0"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke-sized run (a few minutes)")
    parser.add_argument("--output-dir", type=Path, default=REPO / "results" / "replication",
                        help="runs, evaluations and the plots' first copies (default: results/replication)")
    parser.add_argument("--report", type=Path, default=REPO / "docs" / "results" / "cipo_vs_grpo.md",
                        help="the Markdown report; its PNGs go next to it in <stem>_*.png")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the seeds (default 0 1 2)")
    parser.add_argument("--ablations", action="store_true", help="also run the CIPO ablations on the first seed")
    parser.add_argument("--ablations-only", action="store_true",
                        help="run only the ablations, from the first seed's finished runs in --output-dir, then report")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from --output-dir")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine more threads spin and run slower)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------- data


def problem_sets(sizes: Sizes) -> dict[str, list[SumProblem]]:
    """Train, validation (during training), held-out and hard sets; no evaluation problem is a training one."""
    train = generate_problems(TRAIN_SPEC, count=sizes.train_problems, seed=DATA_SEED, prefix="train")
    seen = frozenset(p.terms for p in train)
    validation = generate_problems(TRAIN_SPEC, count=sizes.validation_items, seed=DATA_SEED + 1, prefix="val",
                                   exclude=seen)
    heldout = generate_problems(TRAIN_SPEC, count=sizes.heldout_problems, seed=DATA_SEED + 2, prefix=HELDOUT,
                                exclude=seen | frozenset(p.terms for p in validation))
    hard = generate_problems(HARD_SPEC, count=sizes.hard_problems, seed=DATA_SEED + 3, prefix=HARD, exclude=seen)
    return {"train": train, "validation": validation, HELDOUT: heldout, HARD: hard}


# ---------------------------------------------------------------------------------------------- one seed


def run_seed(seed: int, sizes: Sizes, sets: dict[str, list[SumProblem]], out: Path, *, ablations: bool) -> dict:
    """Warm start, both arms (and the ablations), every evaluation; writes and returns seed<N>/summary.json."""
    seed_dir = out / f"seed{seed}"
    data = {name: write_jsonl(sets[name], out / "data" / f"{name}.jsonl") for name in ("train", "validation")}
    overrides = shared_overrides(sizes, model_dir=seed_dir / "warm_start", train_file=data["train"],
                                 validation_file=data["validation"], run_dir=seed_dir / "runs" / "placeholder",
                                 seed=seed)
    base_cfg = arm_config(overrides, arm="cipo")
    started = time.monotonic()
    warm_dir = build_warm_start(seed_dir / "warm_start", sets["train"], base_cfg, sizes.warm_start, seed=seed)
    warm_seconds = time.monotonic() - started
    answers = [answer_benchmark(HELDOUT, sets[HELDOUT]), answer_benchmark(HARD, sets[HARD])]
    evaluate = lambda model, benchmarks, name: headline(evaluate_model(  # noqa: E731
        model, benchmarks, base_cfg, n=sizes.eval_samples, k_list=eval_k(sizes), seed=seed,
        output_dir=seed_dir / "eval" / name))
    warm_eval = evaluate(warm_dir, answers, "warm")
    correction = correction_benchmark(sets[HELDOUT], seed_dir / "eval" / "warm")
    warm_eval.update(evaluate(warm_dir, [correction], "warm_correction"))
    print(f"[seed {seed}] warm start ({warm_seconds:.0f}s): held-out pass@1 {warm_eval[HELDOUT]['avg']:.3f}, "
          f"hard pass@1 {warm_eval[HARD]['avg']:.3f}", flush=True)
    summary = {"seed": seed, "warm_seconds": warm_seconds, "eval": {"warm": warm_eval}}
    for arm in rep.ARMS:
        result = run_arm(arm_config(_with_run_dir(overrides, seed_dir / "runs" / arm), arm=arm))
        summary[arm] = {"records": result.records, "val0": result.val0, "data_order": result.data_order,
                        "seconds": result.seconds}
        summary["eval"][arm] = evaluate(result.hf_model, [*answers, correction], arm)
        print(f"[seed {seed}] {arm}: {len(result.records)} steps in {result.seconds:.0f}s, held-out pass@1 "
              f"{summary['eval'][arm][HELDOUT]['avg']:.3f}", flush=True)
    summary["same_data_order"] = summary["grpo"]["data_order"] == summary["cipo"]["data_order"]
    (seed_dir / SUMMARY_FILE).write_text(json.dumps(summary))
    if ablations:
        summary = run_ablations(seed, sizes, sets, out)
    return summary


def run_ablations(seed: int, sizes: Sizes, sets: dict[str, list[SumProblem]], out: Path) -> dict:
    """The CIPO variants of ABLATIONS from the seed's existing warm start; adds them to its summary.json."""
    seed_dir = out / f"seed{seed}"
    summary = json.loads((seed_dir / SUMMARY_FILE).read_text())
    data = {name: out / "data" / f"{name}.jsonl" for name in ("train", "validation")}
    overrides = shared_overrides(sizes, model_dir=seed_dir / "warm_start", train_file=data["train"],
                                 validation_file=data["validation"], run_dir=seed_dir / "runs" / "placeholder",
                                 seed=seed)
    base_cfg = arm_config(overrides, arm="cipo")
    benchmarks = [answer_benchmark(HELDOUT, sets[HELDOUT]), answer_benchmark(HARD, sets[HARD]),
                  correction_benchmark(sets[HELDOUT], seed_dir / "eval" / "warm")]
    summary["ablations"] = []
    for name, override in [(name, override) for name, override in ABLATIONS if name in sizes.ablations]:
        slug = name.replace(" ", "_").replace("=", "")
        result = run_arm(arm_config(_with_run_dir(overrides, seed_dir / "runs" / f"ablation_{slug}"), arm="cipo",
                                    extra=tuple(override.split(","))))
        evaluation = headline(evaluate_model(result.hf_model, benchmarks, base_cfg, n=sizes.eval_samples,
                                             k_list=eval_k(sizes), seed=seed,
                                             output_dir=seed_dir / "eval" / f"ablation_{slug}"))
        print(f"[ablation {name}] {result.seconds:.0f}s, held-out pass@1 {evaluation[HELDOUT]['avg']:.3f}", flush=True)
        summary["ablations"].append({"name": name, "override": override, "eval": evaluation,
                                     "records": result.records})
        (seed_dir / SUMMARY_FILE).write_text(json.dumps(summary))  # each finished variant survives an interruption
    return summary


def _with_run_dir(overrides: list[str], run_dir: Path) -> list[str]:
    keep = [o for o in overrides if not o.startswith(("run.output_dir=", "run.name="))]
    return [*keep, f"run.output_dir={run_dir}", f"run.name={run_dir.name}"]


def eval_k(sizes: Sizes) -> tuple[int, ...]:
    return tuple(k for k in PASS_K if k <= sizes.eval_samples)


# ---------------------------------------------------------------------------------------------- report


def write_report(seeds: list[dict], sizes: Sizes, report_path: Path, *, output_dir: Path, command: str,
                 minutes: float | None) -> Path:
    """The Markdown report and its PNGs (next to it, <stem>_*.png)."""
    k_list = eval_k(sizes)
    for summary in seeds:
        seed_dir = output_dir / f"seed{summary['seed']}"
        summary["answer_rates"] = saved_answer_rates(seed_dir / "eval")
        summary["rho"] = yaml.safe_load((seed_dir / "runs" / "cipo" / "config.yaml").read_text())["cipo"]["rho"]
    stem = report_path.stem
    plots = {
        "training": rep.plot_training(seeds, report_path.parent / f"{stem}_training.png"),
        "pass_at_k": rep.plot_pass_at_k(seeds, k_list, report_path.parent / f"{stem}_pass_at_k.png"),
        "correction": rep.plot_correction(seeds, report_path.parent / f"{stem}_correction.png"),
    }
    verdicts = rep.claim_verdicts(seeds, k_list[-1])
    text = render_markdown(seeds, sizes, k_list, verdicts, plots, command=command, minutes=minutes)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(text)
    (report_path.parent / f"{stem}_verdicts.json").write_text(json.dumps(verdicts, indent=1))
    return report_path


def render_markdown(seeds, sizes, k_list, verdicts, plots, *, command: str, minutes: float | None) -> str:
    from benchmarks.studies.replication.markdown import render

    return render(seeds=seeds, sizes=asdict(sizes), k_list=k_list, verdicts=verdicts,
                  plots={name: path.name for name, path in plots.items()}, command=command, minutes=minutes,
                  composition=set_composition(problem_sets(sizes)))


def set_composition(sets: dict[str, list[SumProblem]]) -> dict[str, dict[int, int]]:
    """Problems per number of terms in each set (unseen problems skew long: every short one is in training)."""
    return {name: dict(sorted(Counter(len(p.terms) for p in problems).items())) for name, problems in sets.items()}


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sizes = QUICK if args.quick else FULL
    seeds = tuple(args.seeds) if args.seeds else sizes.seeds
    command = " ".join(["python benchmarks/studies/replicate_cipo_vs_grpo.py", *map(shlex.quote, argv or sys.argv[1:])])
    started = time.monotonic()
    if args.ablations_only:
        run_ablations(seeds[0], sizes, problem_sets(sizes), args.output_dir)
    if args.report_only or args.ablations_only:
        summaries = [json.loads((args.output_dir / f"seed{s}" / SUMMARY_FILE).read_text()) for s in seeds]
        minutes = None
        run_info = args.output_dir / RUN_INFO_FILE
        if run_info.is_file():  # report the run that trained, not this re-rendering
            info = json.loads(run_info.read_text())
            command, minutes = info["command"], info["minutes"]
    else:
        sets = problem_sets(sizes)
        summaries = [run_seed(seed, sizes, sets, args.output_dir, ablations=args.ablations and seed == seeds[0])
                     for seed in seeds]
        minutes = (time.monotonic() - started) / 60
        (args.output_dir / RUN_INFO_FILE).write_text(json.dumps({"command": command, "minutes": minutes}))
    path = write_report(summaries, sizes, args.report, output_dir=args.output_dir, command=command, minutes=minutes)
    for v in rep.claim_verdicts(summaries, eval_k(sizes)[-1]):
        print(f"{v['claim']}: {v['verdict'].upper()} -- {v['evidence']}")
    print(f"report: {path} ({(time.monotonic() - started) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
