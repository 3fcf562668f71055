"""The corrections study's design: its settings, the three arms' configs, and the problems every model is evaluated on.

Everything here is fixed by the registration (registration.json holds `Design.as_dict()` and a hash of each arm's
resolved config); a run whose design or configs differ from the registered ones does not start.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cipo_nemo.algorithms.rewards import SUCCESS_THRESHOLD
from cipo_nemo.config import MasterConfig, load_config
from cipo_nemo.data.sources import TaskItem, load_items
from cipo_nemo.eval.benchmarks import Benchmark

REPO = Path(__file__).resolve().parents[3]
ARMS = ("grpo", "cipo", "frozen")  # frozen: CIPO whose correction prompts quote frozen start-model attempts
MODELS = ("start", *ARMS)
HELDOUT = "heldout"
POOL_SEED_OFFSET = 3_000_017  # held-out pool generator seed = training seed + this + 7919 * study seed
ATTEMPT_SEED = 2_718  # sampling seed of the start model's attempts at the training items (one set for all seeds)
# Config keys that name a run rather than a method: left out of the registered config hash.
RUN_KEYS = (("run", "output_dir"), ("run", "name"), ("run", "seed"), ("checkpointing", "stop_after_step"),
            ("cipo", "frozen_attempts"))

# A correction template no arm ever trained on (the transfer test): another framing of the same request, with the
# same answer format the verifier reads. The trained one is the config's cipo.templates.math.
REWORDED_TEMPLATE = (
    "A student was given this task:\n{problem}\n\nThe student's answer was:\n{attempt}\n\nCheck the student's answer. "
    "If it contains a mistake, give the right calculation; if it is right, repeat it. Write the calculation, then "
    "finish with: The answer is <number>."
)


@dataclass(frozen=True)
class Design:
    config: str = "conf/study_smollm2_warm.yaml"  # relative to the repository (or absolute)
    overrides: tuple[str, ...] = ()  # shared by every arm and the evaluations
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 100
    part_steps: int = 50  # a training unit trains at most this many steps (then checkpoints and ends)
    prompts_per_step: int = 8
    samples_per_prompt: int = 4
    save_every: int = 10
    eval_samples: int = 16  # n per problem, every evaluation
    # held-out problems per seed (avg@n over all of them; the correction problems are drawn from them). The issue
    # asked for 192; 384 because the correction set needs 128 problems where the start model made both a wrong and a
    # right attempt, and seed 0's start did so on 32 of 64 held-out problems at 16 samples (a share of 0.5, from 64
    # problems): 384 needs a share of 1/3, 192 would need 2/3.
    pool_problems: int = 384
    correction_problems: int = 128  # per seed: problems where the start model made both a wrong and a right attempt
    attempt_samples: int = 16  # start-model attempts per training item (the frozen arm's quotes)
    attempt_parts: int = 2  # the attempts are sampled in this many units
    reworded_template: str = REWORDED_TEMPLATE

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["overrides"], out["seeds"] = list(self.overrides), list(self.seeds)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Design:
        return cls(**{**data, "overrides": tuple(data["overrides"]), "seeds": tuple(data["seeds"])})

    @property
    def config_path(self) -> Path:
        path = Path(self.config)
        return path if path.is_absolute() else REPO / path

    @property
    def parts(self) -> list[int]:
        """The last step of each training unit."""
        return [min(end, self.steps) for end in range(self.part_steps, self.steps + self.part_steps, self.part_steps)]

    @property
    def k_list(self) -> list[int]:
        return sorted({k for k in (1, 4, 16) if k <= self.eval_samples} | {self.eval_samples})


# ---------------------------------------------------------------------------------------------- configs


def arm_overrides(design: Design, arm: str, *, run_dir: Path, seed: int, frozen_attempts: Path | None,
                  stop_after: int | None) -> list[str]:
    """Every arm: the study's batch shape, cadence and seed, the shared overrides; then what makes the arm."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}: one of {', '.join(ARMS)}")
    shared = [
        f"run.output_dir={run_dir}", f"run.name=corrections_{arm}_seed{seed}", f"run.seed={seed}",
        f"grpo.num_steps={design.steps}", f"grpo.prompts_per_step={design.prompts_per_step}",
        f"grpo.samples_per_prompt={design.samples_per_prompt}", f"checkpointing.save_every={design.save_every}",
        "checkpointing.save_hf_at_end=true", "checkpointing.resume=auto",
        f"checkpointing.stop_after_step={'null' if stop_after is None or stop_after >= design.steps else stop_after}",
        *design.overrides,
    ]
    if arm == "grpo":
        return [*shared, "cipo.enabled=false"]
    if arm == "cipo":
        return [*shared, "cipo.enabled=true"]
    return [*shared, "cipo.enabled=true", "cipo.anchor_source=frozen_start",
            f"cipo.frozen_attempts={frozen_attempts or '/not-yet-sampled/frozen_attempts.jsonl'}"]


def arm_config(design: Design, arm: str, *, run_dir: Path, seed: int, frozen_attempts: Path | None = None,
               stop_after: int | None = None) -> MasterConfig:
    return load_config(design.config_path, arm_overrides(design, arm, run_dir=run_dir, seed=seed,
                                                         frozen_attempts=frozen_attempts, stop_after=stop_after))


def evaluation_config(design: Design) -> MasterConfig:
    """What every evaluation samples with: the study config and shared overrides (data, sampling, context)."""
    return load_config(design.config_path, list(design.overrides))


def method_config(cfg: MasterConfig) -> dict[str, Any]:
    """The resolved config without the keys that name a run (RUN_KEYS): equal for every seed and part of one arm."""
    data = cfg.model_dump(mode="json")
    for section, key in RUN_KEYS:
        data.get(section, {}).pop(key, None)
    return data


def config_fingerprint(cfg: MasterConfig) -> str:
    """sha256 of method_config: different when anything that shapes training or sampling differs."""
    return hashlib.sha256(json.dumps(method_config(cfg), sort_keys=True).encode()).hexdigest()


def registered_configs(design: Design) -> dict[str, dict[str, Any]]:
    """The method config of each arm and of the evaluations (seed, paths and part left out)."""
    out = {arm: method_config(arm_config(design, arm, run_dir=Path("/run"), seed=0)) for arm in ARMS}
    out["evaluation"] = method_config(evaluation_config(design))
    return out


def registered_fingerprints(design: Design) -> dict[str, str]:
    """The config hash of each arm and of the evaluations."""
    return {name: hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
            for name, data in registered_configs(design).items()}


def changed_keys(registered: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two method configs (added and removed keys included)."""
    keys = []
    for key in sorted(set(registered) | set(now)):
        old, new = registered.get(key, "<absent>"), now.get(key, "<absent>")
        if isinstance(old, dict) and isinstance(new, dict):
            keys += changed_keys(old, new, f"{prefix}{key}.")
        elif old != new:
            keys.append(f"{prefix}{key}")
    return keys


# ---------------------------------------------------------------------------------------------- problems


def training_items(design: Design) -> list[TaskItem]:
    cfg = evaluation_config(design)
    if cfg.data.train.kind != "reasoning_gym":
        raise SystemExit(f"{design.config}: data.train.kind must be reasoning_gym for this study")
    return load_items(cfg.data.train)[0]


def heldout_pool(design: Design, seed: int, training: list[TaskItem]) -> list[TaskItem]:
    """The seed's held-out problems: the training generator and options under another generator seed, without any
    problem whose text is a training problem's, each text once."""
    source = evaluation_config(design).data.train
    generator = source.reasoning_gym
    spec = generator.model_copy(update={"seed": generator.seed + POOL_SEED_OFFSET + 7919 * seed,
                                        "size": 2 * design.pool_problems})
    seen = {item.prompt for item in training}
    pool = []
    for item in load_items(source.model_copy(update={"reasoning_gym": spec}))[0]:
        if item.prompt not in seen:
            seen.add(item.prompt)
            pool.append(item)
    if len(pool) < design.pool_problems:
        raise SystemExit(f"seed {seed}: only {len(pool)} distinct held-out problems, {design.pool_problems} needed")
    return pool[: design.pool_problems]


def answer_benchmark(name: str, items: list[TaskItem]) -> Benchmark:
    return Benchmark(name=name, kind="answer", items=items, source=f"study_corrections:{name}")


def select_correction_set(pool: list[TaskItem], samples: list[dict[str, Any]], *, count: int,
                          seed: int) -> list[dict[str, Any]]:
    """The first `count` pool problems (in pool order) where the start model's samples hold both a wrong and a
    right attempt, with one of each drawn at random (seeded per problem): each is quoted once in each role."""
    by_id = {record["id"]: record for record in samples if record["benchmark"] == HELDOUT}
    chosen = []
    for item in pool:
        record = by_id.get(item.id)
        if record is None:
            continue
        right = [text for text, reward in zip(record["responses"], record["rewards"]) if reward > SUCCESS_THRESHOLD]
        wrong = [text for text, reward in zip(record["responses"], record["rewards"]) if reward <= SUCCESS_THRESHOLD]
        if right and wrong:
            draw = random.Random(f"{seed}:{item.id}")
            chosen.append({"id": item.id, "wrong": draw.choice(wrong), "right": draw.choice(right)})
        if len(chosen) == count:
            return chosen
    raise SystemExit(f"seed {seed}: the start model made both a wrong and a right attempt at only {len(chosen)} of "
                     f"{len(pool)} held-out problems; the registered design needs {count}")


def correction_benchmarks(pool: list[TaskItem], correction_set: list[dict[str, Any]], *, suffix: str,
                          template: str | None = None) -> list[Benchmark]:
    """fix_<suffix>: every correction problem with its wrong attempt; keep_<suffix>: with its right attempt; each
    in `template` (None: the config's cipo.templates, the one the CIPO arms trained on)."""
    items = {item.id: item for item in pool}
    problems = [items[entry["id"]] for entry in correction_set]
    return [Benchmark(name=f"{role}_{suffix}", kind="correction", items=problems,
                      source=f"start-model attempts ({'wrong' if role == 'fix' else 'right'})",
                      attempts=[entry[key] for entry in correction_set],
                      attempt_correct=[role == "keep"] * len(problems),
                      templates=[template] * len(problems) if template is not None else [])
            for role, key in (("fix", "wrong"), ("keep", "right"))]
