"""Correction after CIPO, GRPO and frozen-anchor CIPO: a pre-registered study in resumable units (issue 27).

Three arms from one format-warmed start (conf/study_smollm2_warm.yaml, benchmarks/studies/format_warmup.py): GRPO,
CIPO, and CIPO whose correction prompts quote frozen start-model attempts (`cipo.anchor_source: frozen_start`), on
several training seeds; every model evaluated on a held-out pool and on correction prompts quoting the start
model's own wrong and right attempts, on the trained template and on a reworded one (the package
benchmarks/studies/corrections/: design, units, registration, analysis, report).

In order:

    # 1. register (the design, claims, verdict rules, power, configs and analysis hashes), then commit it alone
    python benchmarks/studies/study_corrections.py --register
    git add docs/results/study_corrections/registration.json && git commit -m "..."
    # then run from that commit's code (a branch from it): a later config default would change the arms' hashes
    # 2. what remains and how long it will take (the default action)
    python benchmarks/studies/study_corrections.py
    # 3. run units (each skipped when done, resumed when interrupted), at most --budget of them, under the lock
    python benchmarks/studies/study_corrections.py --run --budget 3h --lock /tmp/cipo_heavy.lock
    # 4. the report, from the committed results alone
    python benchmarks/studies/study_corrections.py --report

`--run` reads the design from the registration (no flags change it) and refuses to start unless the registration
is committed and the arms' configs still hash as registered. Commit the results directory after each session. The
report uses only the units that git shows to follow the registration (corrections/registration.py).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from benchmarks.studies.corrections import analysis  # noqa: E402
from benchmarks.studies.corrections.design import Design, training_items  # noqa: E402
from benchmarks.studies.corrections.registration import (  # noqa: E402
    build_registration,
    check_before_running,
    load_registration,
    write_registration,
)
from benchmarks.studies.corrections.report import write_report  # noqa: E402
from benchmarks.studies.corrections.units import (  # noqa: E402
    Paths,
    check_one_start_model,
    estimate,
    format_duration,
    is_done,
    make_context,
    measured_rates,
    plan_units,
    run_unit,
    status_lines,
)

REPO = Path(__file__).resolve().parents[2]
SEED0 = REPO / "docs" / "results" / "study_instruct" / "seed0"  # the spreads the power calculation starts from


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--register", action="store_true", help="write registration.json (before any unit runs)")
    action.add_argument("--run", action="store_true", help="run the units not done yet")
    action.add_argument("--report", action="store_true", help="write the report from the results directory")
    parser.add_argument("--results-dir", type=Path, default=REPO / "docs" / "results" / "study_corrections")
    parser.add_argument("--output-dir", type=Path, default=REPO / "results" / "study_corrections",
                        help="run directories, checkpoints, final policies (not committed)")
    parser.add_argument("--report-file", type=Path, default=REPO / "docs" / "results" / "study_corrections.md")
    parser.add_argument("--budget", type=parse_budget, default=None,
                        help="--run: start no unit whose estimate would end after this long (e.g. 3h, 90m)")
    parser.add_argument("--max-units", type=int, default=None, help="--run: run at most this many units")
    parser.add_argument("--lock", type=Path, default=None,
                        help="--run: hold this file's lock during each unit (not between them)")
    design = parser.add_argument_group("--register: the design (defaults are the study's)")
    default = Design()
    design.add_argument("--config", default=default.config)
    design.add_argument("--seeds", type=int, nargs="+", default=list(default.seeds))
    for name in ("steps", "part_steps", "prompts_per_step", "samples_per_prompt", "save_every", "eval_samples",
                 "pool_problems", "correction_problems", "attempt_samples", "attempt_parts"):
        design.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(default, name))
    design.add_argument("--power-replicates", type=int, default=200,
                        help="simulated studies per power/size cell (0: normal approximation only)")
    design.add_argument("overrides", nargs="*", help="config overrides shared by every arm (key=value)")
    return parser.parse_args(argv)


def parse_budget(text: str) -> float:
    """'3h', '90m', '1h30m' or seconds -> seconds."""
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?|(\d+)", text.strip())
    if not match or not any(match.groups()):
        raise argparse.ArgumentTypeError(f"{text!r}: write a duration as 3h, 90m, 1h30m or seconds")
    hours, minutes, seconds = (int(group) if group else 0 for group in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def design_from_args(args: argparse.Namespace) -> Design:
    names = ("steps", "part_steps", "prompts_per_step", "samples_per_prompt", "save_every", "eval_samples",
             "pool_problems", "correction_problems", "attempt_samples", "attempt_parts")
    return Design(config=args.config, overrides=tuple(args.overrides), seeds=tuple(args.seeds),
                  **{name: getattr(args, name) for name in names})


def registered_design(results_dir: Path) -> Design:
    registration = load_registration(results_dir)
    if registration is None:
        raise SystemExit(f"{results_dir}: no registration.json; write it with --register and commit it first")
    return Design.from_dict(registration["design"])


@contextlib.contextmanager
def held(lock: Path | None) -> Iterator[None]:
    if lock is None:
        yield
        return
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def register(args: argparse.Namespace) -> Path:
    design = design_from_args(args)
    seed0 = {arm: json.loads((SEED0 / arm / "results.json").read_text()) for arm in ("grpo", "cipo")}
    spreads = analysis.seed0_spreads(seed0["grpo"], seed0["cipo"])
    problems = {"heldout": design.pool_problems, "fix": design.correction_problems,
                "keep": design.correction_problems, "bal": design.correction_problems}
    power = analysis.power_table(spreads, problems=problems, samples=design.eval_samples,
                                 replicates=args.power_replicates)
    return write_registration(args.results_dir, build_registration(design, power))


def run(args: argparse.Namespace) -> None:
    design = registered_design(args.results_dir)
    check_before_running(design, args.results_dir)
    paths = Paths(results_dir=args.results_dir, output_dir=args.output_dir)
    context = make_context(design, paths)
    units = plan_units(design, training_items=len(context.training))
    check_one_start_model(units, paths, context.fingerprint)
    started, ran = time.monotonic(), 0
    for unit in units:
        if is_done(unit, paths):
            continue
        if args.max_units is not None and ran >= args.max_units:
            print(f"--max-units {args.max_units} reached", flush=True)
            break
        seconds, _ = estimate(unit, measured_rates(units, paths), paths, design)
        if args.budget is not None and time.monotonic() - started + seconds > args.budget:
            print(f"next unit {unit.name} (~{format_duration(seconds)}) does not fit in what is left of --budget",
                  flush=True)
            break
        print(f"[{time.strftime('%H:%M:%S')}] {unit.name}: starting (~{format_duration(seconds)})", flush=True)
        with held(args.lock):
            record = run_unit(unit, context)
        ran += 1
        print(f"[{time.strftime('%H:%M:%S')}] {unit.name}: done in {format_duration(record['seconds'])}", flush=True)
    print("\n".join(status_lines(units, paths, design)), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.register:
        print(f"registration: {register(args)} (commit it, alone, before running any unit)")
        return 0
    if args.run:
        run(args)
    if args.run or args.report:
        print(f"report: {write_report(args.results_dir, args.report_file)}")
        return 0
    design = registered_design(args.results_dir)
    paths = Paths(results_dir=args.results_dir, output_dir=args.output_dir)
    print("\n".join(status_lines(design_units(design), paths, design)))
    return 0


def design_units(design: Design) -> list:
    return plan_units(design, training_items=len(training_items(design)))


if __name__ == "__main__":
    raise SystemExit(main())
