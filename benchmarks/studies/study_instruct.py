"""CIPO vs GRPO from a real instruct checkpoint, in resumable units, with paired per-problem intervals.

Per seed, in order, each unit skipped when its results exist and resumed when it was interrupted:

  start   evaluate the start checkpoint: held-out avg@n / pass@k, the hard split, and its own held-out attempts
          as correction prompts (wrong->right, right->right), plain accuracy on the same problems;
  grpo    train GRPO (`cipo.enabled=false`) through the real loop (checkpoints every --save-every steps: a killed
          arm resumes from its latest one), then evaluate its final policy on the same three sets;
  cipo    the same with the correction stream on.

Both arms: the same config (--config + overrides), seed, data order, steps and batch shape. The small results of
every finished unit (metrics.jsonl, config.yaml, the evaluation's results.json with per-problem rewards, the
sample dumps) are copied to --results-dir, meant to be committed, so the study can run in parts, days apart; the
report (--report) is rebuilt from those files alone. The pre-registration (metrics and test) is written to
--results-dir before the first unit runs and never changed afterwards; the report quotes it. Each finished unit
records the sha256 of the start model's weights; an invocation whose start model differs (the warm-up redone on
another machine) stops before any work instead of comparing arms that started from different weights.

    python benchmarks/studies/study_instruct.py --steps 100 --prompts-per-step 8 --samples-per-prompt 4
    python benchmarks/studies/study_instruct.py --report-only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from benchmarks.studies.replication.arms import run_arm  # noqa: E402
from benchmarks.studies.replication.study_report import PREREGISTRATION, write_report  # noqa: E402
from cipo_nemo.algorithms.rewards import SUCCESS_THRESHOLD  # noqa: E402
from cipo_nemo.config import MasterConfig, load_config  # noqa: E402
from cipo_nemo.data.sources import TaskItem, load_items  # noqa: E402
from cipo_nemo.eval.benchmarks import Benchmark  # noqa: E402
from cipo_nemo.eval.harness import evaluate  # noqa: E402
from cipo_nemo.eval.report import SAMPLES_FILE  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ARMS = ("grpo", "cipo")
HELDOUT, HARD, CORRECTION = "heldout", "hard", "correction"
DONE_FILE = "done.json"
START_MODEL_KEY = "start_model_sha256"  # in done.json: the weights the unit's models descend from
SMALL_RUN_FILES = ("metrics.jsonl", "config.yaml", "val0.json", "data_order.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "conf" / "cipo_smollm2_cpu.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--save-every", type=int, default=10, help="checkpoint cadence: what an interruption loses")
    parser.add_argument("--heldout", type=int, default=64, help="held-out problems (same generator, another seed)")
    parser.add_argument("--hard-options", type=json.loads, default={},
                        help="JSON: generator options of the hard split, over the training ones")
    parser.add_argument("--eval-n", type=int, default=32, help="samples per problem at evaluation (pass@k, k <= n)")
    parser.add_argument("--output-dir", type=Path, default=REPO / "results" / "study_instruct")
    parser.add_argument("--results-dir", type=Path, default=REPO / "docs" / "results" / "study_instruct")
    parser.add_argument("--report", type=Path, default=REPO / "docs" / "results" / "study_instruct.md")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from --results-dir")
    parser.add_argument("overrides", nargs="*", help="config overrides shared by both arms (key=value)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------- config and data


def arm_config(args: argparse.Namespace, *, seed: int, arm: str) -> MasterConfig:
    """Both arms' config: --config, the study's batch shape and cadence, the user's overrides; GRPO switches the
    correction stream off and changes nothing else."""
    run_dir = args.output_dir / f"seed{seed}" / arm
    overrides = [
        f"run.output_dir={run_dir}", f"run.name=study_{arm}_seed{seed}", f"run.seed={seed}",
        f"grpo.num_steps={args.steps}", f"grpo.prompts_per_step={args.prompts_per_step}",
        f"grpo.samples_per_prompt={args.samples_per_prompt}", f"checkpointing.save_every={args.save_every}",
        "checkpointing.save_hf_at_end=true", "checkpointing.resume=auto", *args.overrides,
        f"cipo.enabled={'true' if arm == 'cipo' else 'false'}",
    ]
    return load_config(args.config, overrides)


def evaluation_sets(cfg: MasterConfig, args: argparse.Namespace) -> dict[str, list[TaskItem]]:
    """Held-out (the training generator, another seed) and hard (its options over the training ones) problems."""
    source = cfg.data.train
    if source.kind != "reasoning_gym":
        raise SystemExit(f"{args.config}: data.train.kind must be reasoning_gym for this study, got {source.kind}")
    generator = source.reasoning_gym
    heldout = generator.model_copy(update={"seed": generator.seed + 1_000_003, "size": args.heldout})
    hard = heldout.model_copy(update={"seed": generator.seed + 2_000_003,
                                      "options": {**generator.options, **args.hard_options}})
    return {name: load_items(source.model_copy(update={"reasoning_gym": spec}))[0]
            for name, spec in ((HELDOUT, heldout), (HARD, hard))}


# ---------------------------------------------------------------------------------------------- units


def unit_dir(args: argparse.Namespace, seed: int, unit: str) -> Path:
    return args.results_dir / f"seed{seed}" / unit


def start_model_fingerprint(model: str) -> str:
    """sha256 of a local start model's weight files; a hub id stands for itself. The format warm-up is
    bit-reproducible on one CPU kind but not across kinds (its bf16 training differs in the last digits;
    docs/notes/reproducibility_across_machines.md), so a seed's units must be checked to come from the same
    weights, not from the same path."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return model
    digest = hashlib.sha256()
    for weights in sorted(path.glob("*.safetensors")):
        with weights.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def check_same_start_model(args: argparse.Namespace, seed: int, fingerprint: str) -> None:
    """Stop, before any work, when a finished unit of this seed started from other weights."""
    for unit in ("start", *ARMS):
        done = unit_dir(args, seed, unit) / DONE_FILE
        if not done.is_file():
            continue
        recorded = json.loads(done.read_text()).get(START_MODEL_KEY)
        if recorded != fingerprint:
            raise SystemExit(
                f"{done}: this unit ran from start-model weights {recorded or '(not recorded)'}, but the start model "
                f"now has {fingerprint}: a comparison needs one start checkpoint. Restore that model, or move "
                f"{done.parent.parent} away to run the whole seed again from the present one.")


def run_unit(args: argparse.Namespace, seed: int, unit: str, sets: dict[str, list[TaskItem]], *,
             fingerprint: str) -> None:
    """One unit, unless its results exist; an interrupted arm resumes from its run directory's checkpoint."""
    done = unit_dir(args, seed, unit) / DONE_FILE
    if done.is_file():
        print(f"[seed {seed}] {unit}: done before ({done}), skipped", flush=True)
        return
    started = time.monotonic()
    cfg = arm_config(args, seed=seed, arm="cipo" if unit == "start" else unit)
    if unit == "start":
        model: Path | str = cfg.policy.model_name
    else:
        run_arm(cfg)
        model = Path(cfg.run.output_dir) / "hf_model"
        copy_small_run_files(Path(cfg.run.output_dir), unit_dir(args, seed, unit))
    results = evaluate_unit(model, cfg, sets, args, seed=seed, start_dir=unit_dir(args, seed, "start"),
                            is_start=unit == "start")
    (unit_dir(args, seed, unit) / "results.json").write_text(json.dumps(results))
    done.write_text(json.dumps({"unit": unit, "seed": seed, "seconds": time.monotonic() - started,
                                "finished": time.strftime("%Y-%m-%d %H:%M:%S"), START_MODEL_KEY: fingerprint}))
    print(f"[seed {seed}] {unit}: {time.monotonic() - started:.0f}s", flush=True)


def evaluate_unit(model: Path | str, cfg: MasterConfig, sets: dict[str, list[TaskItem]], args: argparse.Namespace,
                  *, seed: int, start_dir: Path, is_start: bool) -> dict[str, Any]:
    """The harness on held-out and hard, then on the start model's own held-out attempts (the start unit makes
    them first). Every model is evaluated with the same sampling seed."""
    k_list = [k for k in (1, 2, 4, 8, 16, 32) if k <= args.eval_n]
    scratch = args.output_dir / f"seed{seed}" / "start_eval"
    answers = [Benchmark(name=name, kind="answer", items=items, source=f"study:{name}") for name, items in sets.items()]
    results = evaluate(model, answers, cfg=cfg, n=args.eval_n, k_list=k_list, seed=seed,
                       output_dir=scratch if is_start else None)
    if is_start:
        start_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(scratch / SAMPLES_FILE, start_dir / "attempts.jsonl")  # the attempts every model corrects
    correction = correction_benchmark(sets[HELDOUT], start_dir / "attempts.jsonl")
    corrected = evaluate(model, [correction], cfg=cfg, n=args.eval_n, k_list=k_list, seed=seed)
    results["benchmarks"].update(corrected["benchmarks"])
    return results


def correction_benchmark(problems: list[TaskItem], attempts_file: Path) -> Benchmark:
    """The start model's attempt at each held-out problem, alternating a wrong and a right one where it made both,
    so that wrong->right and right->right are each measured on about half the problems."""
    samples = {record["id"]: record for record in map(json.loads, attempts_file.open()) if record["benchmark"] == HELDOUT}
    attempts, labels = [], []
    for index, item in enumerate(problems):
        record = samples[item.id]
        correct = [reward > SUCCESS_THRESHOLD for reward in record["rewards"]]
        chosen = correct.index(index % 2 == 1) if (index % 2 == 1) in correct else 0
        attempts.append(record["responses"][chosen])
        labels.append(correct[chosen])
    return Benchmark(name=CORRECTION, kind="correction", items=list(problems), source="start-model attempts",
                     attempts=attempts, attempt_correct=labels)


def copy_small_run_files(run_dir: Path, target: Path) -> None:
    """What the report needs from a training run, small enough to commit."""
    target.mkdir(parents=True, exist_ok=True)
    for name in SMALL_RUN_FILES:
        if (run_dir / name).is_file():
            shutil.copy(run_dir / name, target / name)
    if (run_dir / "samples").is_dir():
        shutil.copytree(run_dir / "samples", target / "samples", dirs_exist_ok=True)


def preregister(args: argparse.Namespace) -> None:
    """Written once, before any unit runs; a later invocation with other settings keeps the original."""
    path = args.results_dir / "preregistration.md"
    if path.is_file():
        return
    args.results_dir.mkdir(parents=True, exist_ok=True)
    settings = {key: str(value) for key, value in vars(args).items() if key not in ("report_only",)}
    path.write_text(PREREGISTRATION.format(date=time.strftime("%Y-%m-%d"), settings=json.dumps(settings, indent=1)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.report_only:
        preregister(args)
        for seed in args.seeds:
            cfg = arm_config(args, seed=seed, arm="cipo")
            fingerprint = start_model_fingerprint(cfg.policy.model_name)
            check_same_start_model(args, seed, fingerprint)
            sets = evaluation_sets(cfg, args)
            for unit in ("start", *ARMS):
                run_unit(args, seed, unit, sets, fingerprint=fingerprint)
    path = write_report(args.results_dir, args.report)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
