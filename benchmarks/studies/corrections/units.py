"""The corrections study in units: each resumable, each bounded in length, each recording what it ran at.

Units, in the order they run (a unit is skipped when its `done.json` exists):

  attempts/part<i>          the start model's attempts at the training items (the frozen arm's quotes), one
                            slice of the items each
  seed<S>/start/answers     the start model on the seed's held-out pool; its samples choose the correction set
  seed<S>/<arm>/train<j>    training part j of an arm (grpo, cipo, frozen): up to design.part_steps steps through
                            the real loop, ending with a checkpoint (checkpointing.stop_after_step); an
                            interrupted part resumes from its run directory's latest checkpoint
  seed<S>/<arm>/answers     the arm's final policy on the held-out pool (plain accuracy)
  seed<S>/<arm>/trained     ... on the correction set, the trained template (fix_trained, keep_trained)
  seed<S>/<arm>/reworded    ... on the correction set, the reworded template (fix_reworded, keep_reworded)
  seed<S>/start/trained, seed<S>/start/reworded   the start model's corrections (descriptive, last)

Every finished unit writes, in the results directory (meant to be committed), its small results and a done.json:
seconds, work (samples or steps), when it started and finished, the sha256 of the start weights, the git commit it ran
at (HEAD as it started), the registration's sha256 and the arm's config hash. All units come from one start model: a
unit whose start weights differ from those of the finished units stops before any work.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.studies.corrections.design import (
    ARMS,
    ATTEMPT_SEED,
    HELDOUT,
    Design,
    answer_benchmark,
    arm_config,
    config_fingerprint,
    correction_benchmarks,
    evaluation_config,
    heldout_pool,
    select_correction_set,
    training_items,
)
from benchmarks.studies.corrections.registration import (
    DONE_FILE,
    TIME_FORMAT,
    head_commit,
    registration_sha256,
    tree_changed,
)
from benchmarks.studies.replication.arms import DATA_ORDER_FILE, VAL0_FILE, run_arm
from benchmarks.studies.study_instruct import start_model_fingerprint  # sha256 of the start weights
from cipo_nemo.eval.harness import evaluate
from cipo_nemo.eval.report import SAMPLES_FILE
from cipo_nemo.utils.checkpoint import CHECKPOINTS_DIR, CheckpointManager
from cipo_nemo.utils.logger import METRICS_FILE

CORRECTION_SET_FILE = "correction_set.json"
ATTEMPTS_FILE = "attempts.jsonl"
FROZEN_ATTEMPTS_FILE = "frozen_attempts.jsonl"  # the parts joined, in the output directory (the arm's input)
TRAIN_DIR = "train"  # per arm: the run's small files (metrics, config, data order), refreshed after every part
START_MODEL_KEY = "start_model_sha256"
EVAL_KINDS = ("answers", "trained", "reworded")
# Before any unit of a kind has run here: seconds per step (training, with its validations) and per sample
# (evaluation, the engine start included) measured in the seed-0 study (docs/results/study_instruct/findings.md:
# GRPO 16.0 s and CIPO 40.0 s per step plus validation; start evaluation 843 s for 6,144 samples).
PRIOR_SECONDS = {"train:grpo": 17.0, "train:cipo": 42.0, "train:frozen": 42.0, "evaluation": 0.14}


@dataclass(frozen=True)
class Unit:
    name: str
    kind: str  # attempts, answers, trained, reworded, train
    seed: int | None = None
    model: str | None = None  # start or an arm
    part: int = 0  # attempts: part index (from 1); train: part index (from 1)
    work: int = 0  # samples (evaluations) or steps (training)

    def directory(self, results_dir: Path) -> Path:
        return results_dir / self.name

    @property
    def is_training(self) -> bool:
        return self.kind == "train"


@dataclass(frozen=True)
class Paths:
    results_dir: Path  # committed: registration, done records, small results
    output_dir: Path  # not committed: run directories, checkpoints, final policies, samples

    def run_dir(self, seed: int, arm: str) -> Path:
        return self.output_dir / f"seed{seed}" / arm

    @property
    def frozen_attempts(self) -> Path:
        return self.output_dir / FROZEN_ATTEMPTS_FILE


def plan_units(design: Design, *, training_items: int) -> list[Unit]:
    """Every unit of the study, in running order (`training_items`: how many the start model attempts)."""
    units = [Unit(f"attempts/part{i}", "attempts", part=i,
                  work=_slice_size(training_items, design.attempt_parts, i) * design.attempt_samples)
             for i in range(1, design.attempt_parts + 1)]
    correction_samples = 2 * design.correction_problems * design.eval_samples
    eval_work = {"answers": design.pool_problems * design.eval_samples, "trained": correction_samples,
                 "reworded": correction_samples}
    for seed in design.seeds:
        units.append(Unit(f"seed{seed}/start/answers", "answers", seed, "start", work=eval_work["answers"]))
        for arm in ARMS:
            previous = 0
            for index, end in enumerate(design.parts, start=1):
                units.append(Unit(f"seed{seed}/{arm}/train{index}", "train", seed, arm, part=index,
                                  work=end - previous))
                previous = end
            units += [Unit(f"seed{seed}/{arm}/{kind}", kind, seed, arm, work=eval_work[kind]) for kind in EVAL_KINDS]
        units += [Unit(f"seed{seed}/start/{kind}", kind, seed, "start", work=eval_work[kind])
                  for kind in EVAL_KINDS[1:]]
    return units


def _slice_size(total: int, parts: int, part: int) -> int:
    start, end = _slice(total, parts, part)
    return end - start


def _slice(total: int, parts: int, part: int) -> tuple[int, int]:
    """Items [start, end) of part `part` (from 1) of `parts` near-equal slices."""
    return (total * (part - 1)) // parts, (total * part) // parts


def is_done(unit: Unit, paths: Paths) -> bool:
    return (unit.directory(paths.results_dir) / DONE_FILE).is_file()


def done_record(unit: Unit, paths: Paths) -> dict[str, Any] | None:
    path = unit.directory(paths.results_dir) / DONE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------------------------------------- the start model


def check_one_start_model(units: list[Unit], paths: Paths, fingerprint: str) -> None:
    """Stop, before any work, when a finished unit started from other weights."""
    for unit in units:
        record = done_record(unit, paths)
        if record is not None and record.get(START_MODEL_KEY) != fingerprint:
            raise SystemExit(
                f"{unit.directory(paths.results_dir) / DONE_FILE}: this unit ran from start weights "
                f"{record.get(START_MODEL_KEY) or '(not recorded)'}, but the start model now has {fingerprint}: every "
                "unit of the study needs one start checkpoint. Restore that model (copy its directory from the "
                "machine that made it), or start a new study in a new results directory.")


# ---------------------------------------------------------------------------------------------- running


@dataclass
class Context:
    """What running units needs, computed once per invocation."""

    design: Design
    paths: Paths
    fingerprint: str
    registration: str  # sha256 of registration.json
    training: list[Any]
    pools: dict[int, list[Any]]

    def pool(self, seed: int) -> list[Any]:
        if seed not in self.pools:
            self.pools[seed] = heldout_pool(self.design, seed, self.training)
        return self.pools[seed]


def make_context(design: Design, paths: Paths) -> Context:
    cfg = evaluation_config(design)
    return Context(design=design, paths=paths, fingerprint=start_model_fingerprint(cfg.policy.model_name),
                   registration=registration_sha256(paths.results_dir), training=training_items(design), pools={})


def run_unit(unit: Unit, context: Context) -> dict[str, Any]:
    """Run one unit (its results are written before its done.json); returns the done record."""
    started, started_at = time.monotonic(), time.strftime(TIME_FORMAT, time.gmtime())
    code_commit, code_dirty = head_commit(context.paths.results_dir), tree_changed(context.paths.results_dir)
    target = unit.directory(context.paths.results_dir)
    target.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Any]
    if unit.kind == "attempts":
        extra = run_attempts(unit, context)
    elif unit.is_training:
        extra = run_training(unit, context)
    else:
        extra = run_evaluation(unit, context)
    record = {
        "unit": unit.name, "kind": unit.kind, "seed": unit.seed, "model": unit.model, "work": unit.work,
        "seconds": round(time.monotonic() - started, 1), "started": started_at,
        "finished": time.strftime(TIME_FORMAT, time.gmtime()), START_MODEL_KEY: context.fingerprint,
        "code_commit": code_commit, "code_dirty": code_dirty,  # as the unit started
        "registration_sha256": context.registration, "host": host(), **extra,
    }
    (target / DONE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return record


def host() -> dict[str, Any]:
    """Enough to tell machines apart in the records (timings differ by machine)."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    return {"node": platform.node(), "cpu": model, "cpus": os.cpu_count()}


def run_attempts(unit: Unit, context: Context) -> dict[str, Any]:
    """The start model's attempts at one slice of the training items, as id / responses / rewards lines."""
    design, paths = context.design, context.paths
    start, end = _slice(len(context.training), design.attempt_parts, unit.part)
    items = context.training[start:end]
    scratch = paths.output_dir / unit.name
    cfg = evaluation_config(design)
    evaluate(cfg.policy.model_name, [answer_benchmark("training", items)], cfg=cfg, n=design.attempt_samples,
             k_list=[1], seed=ATTEMPT_SEED, output_dir=scratch)
    lines = [json.dumps({"id": r["id"], "responses": r["responses"], "rewards": r["rewards"]})
             for r in map(json.loads, (scratch / SAMPLES_FILE).open())]
    (unit.directory(paths.results_dir) / ATTEMPTS_FILE).write_text("".join(line + "\n" for line in lines))
    return {"items": [start, end]}


def frozen_attempts_file(design: Design, paths: Paths) -> Path:
    """The attempt parts joined into the file the frozen arm reads (made again when missing)."""
    parts = [paths.results_dir / f"attempts/part{i}" / ATTEMPTS_FILE for i in range(1, design.attempt_parts + 1)]
    missing = [str(part) for part in parts if not part.is_file()]
    if missing:
        raise SystemExit(f"the frozen arm needs the start model's attempts; missing: {', '.join(missing)}")
    target = paths.frozen_attempts
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(part.read_text() for part in parts))
    return target


def run_training(unit: Unit, context: Context) -> dict[str, Any]:
    """One part of an arm: the loop from the run directory's latest checkpoint up to the part's last step."""
    design, paths = context.design, context.paths
    assert unit.seed is not None and unit.model is not None
    end = design.parts[unit.part - 1]
    frozen = frozen_attempts_file(design, paths) if unit.model == "frozen" else None
    run_dir = paths.run_dir(unit.seed, unit.model)
    cfg = arm_config(design, unit.model, run_dir=run_dir, seed=unit.seed, frozen_attempts=frozen, stop_after=end)
    if unit.model == "frozen":
        from cipo_nemo.preflight import check_frozen_attempts

        check_frozen_attempts(cfg, context.training)  # the file covers the training items, before workers start
    result = run_arm(cfg)
    copy_run_files(run_dir, paths.results_dir / f"seed{unit.seed}" / unit.model / TRAIN_DIR)
    steps = [record["step"] for record in result.records]
    extra = {"config_sha256": config_fingerprint(cfg), "last_step": max(steps, default=0), "target_step": end,
             "median_step_seconds": statistics.median(r["timing/step"] for r in result.records
                                                      if r["step"] > end - unit.work) if steps else None}
    if frozen is not None:
        extra["frozen_attempts_sha256"] = hashlib.sha256(frozen.read_bytes()).hexdigest()
    return extra


def copy_run_files(run_dir: Path, target: Path) -> None:
    """What the report needs from a training run, small enough to commit."""
    target.mkdir(parents=True, exist_ok=True)
    for name in (METRICS_FILE, "config.yaml", VAL0_FILE, DATA_ORDER_FILE):
        if (run_dir / name).is_file():
            shutil.copy(run_dir / name, target / name)
    if (run_dir / "samples").is_dir():
        shutil.copytree(run_dir / "samples", target / "samples", dirs_exist_ok=True)


def run_evaluation(unit: Unit, context: Context) -> dict[str, Any]:
    """One evaluation part of one model; the start model's answers also choose the seed's correction set."""
    design, paths = context.design, context.paths
    assert unit.seed is not None and unit.model is not None
    pool = context.pool(unit.seed)
    seed_dir, cfg = paths.results_dir / f"seed{unit.seed}", evaluation_config(design)
    if unit.model == "start":
        model: str | Path = cfg.policy.model_name
    else:
        model = paths.run_dir(unit.seed, unit.model) / "hf_model"
        if not (model / "config.json").is_file():
            raise SystemExit(f"{unit.name}: {model} is missing (the arm's training parts did not finish here)")
    scratch = paths.output_dir / unit.name
    if unit.kind == "answers":
        benchmarks = [answer_benchmark(HELDOUT, pool)]
    else:
        correction_set = json.loads((seed_dir / CORRECTION_SET_FILE).read_text())
        template = None if unit.kind == "trained" else design.reworded_template
        benchmarks = correction_benchmarks(pool, correction_set, suffix=unit.kind, template=template)
    results = evaluate(model, benchmarks, cfg=cfg, n=design.eval_samples, k_list=design.k_list, seed=unit.seed,
                       output_dir=scratch)
    results.pop("files", None)
    (unit.directory(paths.results_dir) / "results.json").write_text(json.dumps(results) + "\n")
    if unit.model == "start" and unit.kind == "answers":
        samples = [json.loads(line) for line in (scratch / SAMPLES_FILE).open()]
        chosen = select_correction_set(pool, samples, count=design.correction_problems, seed=unit.seed)
        (seed_dir / CORRECTION_SET_FILE).write_text(json.dumps(chosen, indent=1) + "\n")
    return {"config_sha256": config_fingerprint(cfg)}


# ---------------------------------------------------------------------------------------------- what remains


def measured_rates(units: list[Unit], paths: Paths) -> dict[str, float]:
    """Seconds per step of each arm's training and per sample of evaluation, from the finished units' records."""
    samples: dict[str, list[float]] = {}
    for unit in units:
        record = done_record(unit, paths)
        if record is None or not record.get("work"):
            continue
        key = f"train:{unit.model}" if unit.is_training else "evaluation"
        samples.setdefault(key, []).append(record["seconds"] / record["work"])
    return {key: statistics.median(values) for key, values in samples.items()}


def steps_already_done(unit: Unit, paths: Paths, design: Design) -> int:
    """Steps of an unfinished training part that its run directory's checkpoints already hold."""
    assert unit.seed is not None and unit.model is not None
    checkpoints = CheckpointManager(paths.run_dir(unit.seed, unit.model) / CHECKPOINTS_DIR, keep_last=1)
    complete = checkpoints.complete_checkpoints()
    if not complete:
        return 0
    step = complete[-1][0]
    first = design.parts[unit.part - 1] - unit.work
    return max(0, min(step - first, unit.work))


def estimate(unit: Unit, rates: dict[str, float], paths: Paths, design: Design) -> tuple[float, bool]:
    """(seconds left, measured here?) for a unit not done."""
    key = f"train:{unit.model}" if unit.is_training else "evaluation"
    rate = rates.get(key)
    measured = rate is not None
    if rate is None and unit.is_training and rates.get("train:cipo") and unit.model == "frozen":
        rate, measured = rates["train:cipo"], True  # the frozen arm's step is CIPO's step
    if rate is None:
        rate = PRIOR_SECONDS[key]
    work = unit.work - (steps_already_done(unit, paths, design) if unit.is_training else 0)
    return rate * work, measured


def remaining(units: list[Unit], paths: Paths, design: Design) -> list[tuple[Unit, float, bool]]:
    rates = measured_rates(units, paths)
    return [(unit, *estimate(unit, rates, paths, design)) for unit in units if not is_done(unit, paths)]


def format_duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def status_lines(units: list[Unit], paths: Paths, design: Design) -> list[str]:
    """What is done, what remains and how long it will take, unit by unit."""
    left = remaining(units, paths, design)
    total = sum(seconds for _, seconds, _ in left)
    lines = [f"{len(units) - len(left)} of {len(units)} units done; {len(left)} to run, about "
             f"{format_duration(total)} on this machine (estimates from units finished here where there are any, "
             "else from the seed-0 study's timings, marked 'prior')"]
    for unit, seconds, measured in left:
        done_steps = steps_already_done(unit, paths, design) if unit.is_training else 0
        note = f" ({done_steps} of {unit.work} steps already checkpointed)" if done_steps else ""
        lines.append(f"  {unit.name:<28} {'~' + format_duration(seconds):>13}{'' if measured else ' (prior)'}{note}")
    if left:
        unit, seconds, _ = max(left, key=lambda entry: entry[1])
        lines.append(f"longest unit left: {unit.name}, ~{format_duration(seconds)}")
    return lines
