"""The CIPO training loop: one controller, one named function per stage, in the order of docs/design.md.

    rollout -> verify -> select anchors -> correction rollout -> verify corrections -> shape and join
    -> advantages -> logprobs -> train -> refit -> update rho

GRPO is the same loop with `cipo.enabled: false` (the correction stages then do nothing). Differences from the
paper, whose exact choices are not public (docs/paper_reconstruction.md): the rho rule, the anchor
rounding and the templates are the reconstruction's defaults, all config keys.

The run around the step (the step loop, validation and checkpoint cadence, early stops) is `cipo_nemo/loop.py`.

Launch: `python -m cipo_nemo --config conf/X.yaml key=value` (one machine; Ray starts in-process);
on a Slurm cluster the same entry point runs on the Ray head (slurm/).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cipo_nemo.algorithms.advantages import correction_advantages, group_advantages
from cipo_nemo.algorithms.anchors import AnchorSelection, select_anchors
from cipo_nemo.algorithms.correction import build_training_batch
from cipo_nemo.algorithms.loss import PolicyLoss
from cipo_nemo.algorithms.rewards import is_success
from cipo_nemo.algorithms.rho import RhoController
from cipo_nemo.config import MasterConfig, to_yaml
from cipo_nemo.data.batch import Batch
from cipo_nemo.data.correction_prompts import render_correction_prompt
from cipo_nemo.data.frozen_attempts import load_frozen_attempts
from cipo_nemo.data.prompts import (
    drop_long_prompts,
    encode_prompts,
    indices_within_budget,
    prompt_token_budget,
    render_prompt,
)
from cipo_nemo.data.sampler import PromptSampler
from cipo_nemo.data.sources import TaskItem, describe, load_items
from cipo_nemo.environments.scoring import TaskScorer
from cipo_nemo.eval.benchmarks import Benchmark
from cipo_nemo.eval.harness import EvalContext, evaluate_benchmarks
from cipo_nemo.models.factory import build_cluster, build_generation, build_policy, build_tokenizer, needs_ray, refit_weights
from cipo_nemo.models.interfaces import GenerationBackend, PolicyBackend, SamplingSettings
from cipo_nemo.models.policy.microbatches import combine_optimizer_steps, plan_mini_batches
from cipo_nemo.models.rollout import responses_to_batch
from cipo_nemo.samples import sample_records, write_samples
from cipo_nemo.utils.checkpoint import POLICY_DIR, TRAINER_STATE, CheckpointManager, resume_checkpoint
from cipo_nemo.utils.logger import MetricsLogger
from cipo_nemo.utils.progress import StepProgress
from cipo_nemo.utils.tracking import ids_to_continue
from cipo_nemo.utils.timing import StageTimer

logger = logging.getLogger(__name__)


@dataclass
class Components:
    """Everything a run holds; built once by `setup`."""

    cfg: MasterConfig
    run_dir: Path
    tokenizer: Any
    train_items: list[TaskItem]
    validation_items: list[TaskItem]
    sampler: PromptSampler
    scorer: TaskScorer
    policy: PolicyBackend
    generation: GenerationBackend
    loss_fn: PolicyLoss
    rho: RhoController
    metrics: MetricsLogger
    checkpoints: CheckpointManager
    cluster: Any  # the Ray virtual cluster, or None when every backend runs in this process
    timer: StageTimer = field(default_factory=StageTimer)
    progress: StepProgress = field(default_factory=StepProgress)
    start_step: int = 0

    def __post_init__(self) -> None:
        self.timer.on_stage = self.progress.stage  # every timed stage shows on the progress line


@dataclass(frozen=True)
class StepRollouts:
    """What the sampling stages of one step produced."""

    items: list[TaskItem]
    base: Batch
    anchors: AnchorSelection | None
    corrections: Batch | None
    dropped_anchors: int  # anchors whose correction prompt did not fit max_total_sequence_length


# ----------------------------------------------------------------------------------------------- setup


def setup(cfg: MasterConfig, loaded_items: dict[str, list[TaskItem]] | None = None) -> Components:
    """Build every component (data, scorer, workers, loss, logger) and resume from a checkpoint if asked.

    `loaded_items` (split -> items) are the preflight's: the data sources are then not read a second time."""
    run_dir = Path(cfg.run.output_dir)
    resume_checkpoint(cfg)  # a checkpoint of another setup stops the run here, before any worker starts
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    tokenizer = build_tokenizer(cfg.policy, chat_template=cfg.data.chat_template)
    loaded_items = loaded_items or {}
    # prompts first: a data set with nothing that fits data.max_prompt_tokens stops here, before Ray and workers
    train_items = load_prompts(cfg, tokenizer, split="train", items=loaded_items.get("train"))
    validation_items = (load_prompts(cfg, tokenizer, split="validation", items=loaded_items.get("validation"))
                        if cfg.data.validation else [])
    cluster = build_cluster(cfg) if needs_ray(cfg) else None
    components = Components(
        cfg=cfg,
        run_dir=run_dir,
        tokenizer=tokenizer,
        train_items=train_items,
        validation_items=validation_items[: cfg.validation.max_items],
        sampler=PromptSampler(train_items, batch_size=cfg.grpo.prompts_per_step, seed=cfg.run.seed,
                              shuffle=cfg.data.shuffle),
        scorer=TaskScorer(verifier=cfg.verifier),
        policy=build_policy(cfg, cluster),
        generation=build_generation(cfg, cluster),
        loss_fn=build_loss(cfg),
        rho=RhoController(cfg.cipo.rho),
        metrics=MetricsLogger(logger_cfg=cfg.logger, run_dir=run_dir, run_name=cfg.run.name,
                              config=cfg.model_dump(mode="json"), continue_ids=ids_to_continue(cfg)),
        checkpoints=CheckpointManager(run_dir / "checkpoints", keep_last=cfg.checkpointing.keep_last,
                                      keep_best=cfg.checkpointing.keep_best,
                                      keep_best_mode=cfg.checkpointing.keep_best_mode),
        cluster=cluster,
    )
    maybe_resume(components)
    return components


def load_prompts(cfg: MasterConfig, tokenizer: Any, *, split: str, items: list[TaskItem] | None) -> list[TaskItem]:
    """The split's items (loaded here unless the preflight already did) without prompts over data.max_prompt_tokens."""
    if items is None:
        items, report = load_items(cfg.data.train if split == "train" else cfg.data.validation)
        logger.info("data.%s: %s", split, describe(report))
    kept, _ = drop_long_prompts(items, tokenizer=tokenizer, instructions=cfg.data.instructions,
                                template_kwargs=cfg.data.chat_template_kwargs,
                                system_prompt=cfg.data.system_prompt, max_prompt_tokens=cfg.data.max_prompt_tokens)
    return kept


def build_loss(cfg: MasterConfig) -> PolicyLoss:
    loss = cfg.loss
    return PolicyLoss(clip_low=loss.clip_low, clip_high=loss.clip_high, normalization=loss.normalization,
                      kl_beta=loss.kl_beta, kl_estimator=loss.kl_estimator,
                      importance_sampling=loss.importance_sampling, is_truncation=loss.is_truncation,
                      loss_weight=cfg.cipo.loss_weight)


# ----------------------------------------------------------------------------------------------- the step


def cipo_step(c: Components, step: int) -> dict[str, float | None]:
    """One CIPO (or GRPO) step; returns its metrics."""
    timer = c.timer
    items = c.sampler.next_batch()
    with timer.time("rollout"):
        base = rollout(c, items, step)
    with timer.time("verify"):
        verify(c, base, items)
    with timer.time("select_anchors"):
        anchors = maybe_select_anchors(c, base, step)
    with timer.time("correction_rollout"):
        corrections, dropped = correction_rollout(c, base, anchors, items, step)
    with timer.time("verify_corrections"):
        if corrections is not None:
            verify(c, corrections, items)
    c.generation.sleep(level=2)  # the refit below overwrites every weight: nothing to offload to host memory
    rollouts = StepRollouts(items, base, anchors, corrections, dropped)
    with timer.time("shape_and_join"):
        batch, cipo_metrics = build_training_batch(base, corrections, anchors=anchors, rho=c.rho.rho,
                                                   risk_penalty=c.cfg.cipo.risk_penalty)
    with timer.time("advantages"):
        compute_advantages(c, batch)
    with timer.time("dump_samples"):
        maybe_dump_samples(c, rollouts, batch, step)
    with timer.time("logprobs"):
        compute_logprobs(c, batch)
    with timer.time("train"):
        train_metrics = train_policy(c, batch, step)
    with timer.time("refit"):
        refit(c)
    update_rho(c, cipo_metrics.retention)
    return step_metrics(c, rollouts, batch, cipo_metrics.as_dict(), train_metrics)


def step_seed(c: Components, step: int, stream: int) -> int:
    # Derived, not drawn: a resumed run samples exactly what the uninterrupted run would have.
    return (c.cfg.run.seed * 1_000_003 + step * 101 + stream) % (2**31)


def rollout(c: Components, items: list[TaskItem], step: int) -> Batch:
    """Base stream: G samples per prompt from the current policy."""
    cfg = c.cfg
    rendered = [render_prompt(item, tokenizer=c.tokenizer, instructions=cfg.data.instructions,
                              template_kwargs=cfg.data.chat_template_kwargs,
                              system_prompt=cfg.data.system_prompt) for item in items]
    prompt_ids = encode_prompts(rendered, tokenizer=c.tokenizer)
    settings = SamplingSettings.from_config(cfg.generation, n=cfg.grpo.samples_per_prompt, seed=step_seed(c, step, 0))
    responses = generate(c, prompt_ids, settings)
    return responses_to_batch(prompt_ids, responses, item_indices=list(range(len(items))), sample_kind="base",
                              tokenizer=c.tokenizer)


def generate(c: Components, prompt_ids: list[list[int]], settings: SamplingSettings) -> Any:
    """The engine's samples for `prompt_ids`, counted on the progress line."""
    total = len(prompt_ids) * settings.n
    c.progress.expect(total, "samples")
    responses = c.generation.generate(prompt_ids, settings)
    c.progress.advance(total)
    return responses


def verify(c: Components, batch: Batch, items: list[TaskItem]) -> None:
    """Score every sample against its item's ground truth; writes `rewards` and `verifier_reason`."""
    scores = c.scorer.score([items[i] for i in batch["item_index"]], batch["response_text"])
    batch["rewards"] = torch.tensor(scores.rewards, dtype=torch.float32)
    batch["verifier_reason"] = scores.reasons


def maybe_select_anchors(c: Components, base: Batch, step: int) -> AnchorSelection | None:
    """Difficulty-aware anchors (paper section 3.3): none for GRPO."""
    correction = c.cfg.cipo
    if not correction.enabled:
        return None
    generator = torch.Generator().manual_seed(step_seed(c, step, 1))
    return select_anchors(base["rewards"], base["group_id"], rho=c.rho.rho,
                          max_anchors_per_step=correction.max_anchors_per_step,
                          difficulty_low=correction.difficulty_low, difficulty_high=correction.difficulty_high,
                          allow_out_of_window=correction.allow_out_of_window, generator=generator,
                          truncated=[reason == "length" for reason in base["finish_reason"]])


def anchor_attempts(
    c: Components, base: Batch, anchors: AnchorSelection, items: list[TaskItem], step: int
) -> list[str | None]:
    """The attempt each anchor's correction prompt quotes (`cipo.anchor_source`): the anchor itself, the policy's
    own base sample; or with frozen_start a start-model attempt at the same problem with the anchor's verdict
    (cipo_nemo/data/frozen_attempts.py), None where there is none (the anchor is then dropped)."""
    correction = c.cfg.cipo
    if correction.anchor_source == "policy":
        return [base["response_text"][i] for i in anchors.indices]
    frozen = load_frozen_attempts(correction.frozen_attempts, is_success=is_success)
    quoted = frozen.quote([items[base["item_index"][i]].id for i in anchors.indices], anchors.anchor_correct,
                          seed=step_seed(c, step, 5))  # stream 5: which frozen attempt each anchor quotes
    if None in quoted:
        logger.info("step %d: %d of %d anchors have no start-model attempt of their verdict; dropped", step,
                    quoted.count(None), len(quoted))
    return quoted


def correction_rollout(
    c: Components, base: Batch, anchors: AnchorSelection | None, items: list[TaskItem], step: int
) -> tuple[Batch | None, int]:
    """Correction stream: G_c samples per correction prompt (problem + the anchor attempt), same pi_old."""
    if anchors is None or len(anchors) == 0:
        return None, 0
    cfg = c.cfg
    attempts = anchor_attempts(c, base, anchors, items, step)
    rendered = [render_correction_prompt(items[base["item_index"][i]], attempt or "", tokenizer=c.tokenizer,
                                         data=cfg.data, correction=cfg.cipo)
                for i, attempt in zip(anchors.indices, attempts)]
    all_prompt_ids = encode_prompts(rendered, tokenizer=c.tokenizer)
    budget = prompt_token_budget(max_total_sequence_length=cfg.policy.max_total_sequence_length,
                                 max_new_tokens=cfg.generation.max_new_tokens)
    kept_anchor_positions = [p for p in indices_within_budget(all_prompt_ids, budget) if attempts[p] is not None]
    if not kept_anchor_positions:
        return None, len(anchors)
    prompt_ids = [all_prompt_ids[position] for position in kept_anchor_positions]
    settings = SamplingSettings.from_config(cfg.generation, n=cfg.cipo.samples_per_anchor, seed=step_seed(c, step, 2))
    responses = generate(c, prompt_ids, settings)
    item_indices = [base["item_index"][anchors.indices[p]] for p in kept_anchor_positions]
    corrections = responses_to_batch(prompt_ids, responses, item_indices=item_indices, sample_kind="correction",
                                     tokenizer=c.tokenizer)
    # anchor_index: position in anchors.indices of the anchor each correction answers
    corrections["anchor_index"] = torch.tensor([kept_anchor_positions[g] for g in corrections["group_id"].tolist()],
                                               dtype=torch.long)
    return corrections, len(anchors) - len(kept_anchor_positions)


def compute_advantages(c: Components, batch: Batch) -> None:
    """Base stream: GRPO, A = (r - mean_group) / (std_group + eps) per prompt group. Correction stream:
    `correction_advantages` in `cipo.advantage_mode` from the raw rewards, the risk penalty applied there."""
    grpo = c.cfg.grpo
    is_correction = torch.tensor([kind == "correction" for kind in batch["sample_kind"]], dtype=torch.bool)
    advantages = torch.zeros_like(batch["raw_rewards"])
    base = ~is_correction
    advantages[base] = group_advantages(batch["raw_rewards"][base], batch["group_id"][base],
                                        normalize_std=grpo.normalize_std, leave_one_out=grpo.leave_one_out,
                                        eps=grpo.std_eps)
    if bool(is_correction.any()):
        advantages[is_correction] = correction_advantages(
            batch["raw_rewards"][is_correction], batch["group_id"][is_correction],
            batch["anchor_correct"][is_correction], mode=c.cfg.cipo.advantage_mode,
            risk_penalty=c.cfg.cipo.risk_penalty, eps=grpo.std_eps)
    batch["advantages"] = advantages


def maybe_dump_samples(c: Components, rollouts: StepRollouts, batch: Batch, step: int) -> None:
    """Every logger.samples_every steps: samples/step_<N>.jsonl, what both streams train on (cipo_nemo/samples.py)."""
    every = c.cfg.logger.samples_every
    if every and step % every == 0:
        records = sample_records(batch, rollouts.anchors, items=rollouts.items, tokenizer=c.tokenizer, step=step)
        write_samples(c.run_dir, step, records)
        c.metrics.log_samples(step, records)  # a table in W&B / MLflow when configured


def compute_logprobs(c: Components, batch: Batch) -> None:
    """pi_old (the trainer's recompute of the sampled tokens) when it can differ from the policy being trained,
    and, for the KL term, the reference policy."""
    if needs_old_logprobs(c, len(batch)):
        batch["old_logprobs"] = c.policy.get_logprobs(batch)
    if c.cfg.loss.kl_beta > 0:
        batch["reference_logprobs"] = c.policy.get_reference_logprobs(batch)


def needs_old_logprobs(c: Components, num_samples: int) -> bool:
    """A separate pi_old pass, unless one optimizer step sees the whole batch (pi_old is then the policy being
    trained: the loss takes it from the training forward pass, detached) and neither the KL term nor truncated
    importance sampling asks for the recompute."""
    policy, loss = c.cfg.policy, c.cfg.loss
    one_step = policy.epochs_per_batch == 1 and (policy.train_global_batch_size or num_samples) >= num_samples
    return not one_step or loss.kl_beta > 0 or loss.importance_sampling


def train_policy(c: Components, batch: Batch, step: int) -> dict[str, float]:
    """`policy.epochs_per_batch` passes over the step's samples in shuffled mini-batches of
    `policy.train_global_batch_size`, one optimizer step each; every mini-batch's loss has its own global
    denominator, and pi_old stays the rollout policy's (computed once, before the first step), so from the second
    step on the ratio pi / pi_old moves away from 1 and the clip ranges bind."""
    policy = c.cfg.policy
    generator = torch.Generator().manual_seed(step_seed(c, step, 4))
    plan = plan_mini_batches(len(batch), size=policy.train_global_batch_size, epochs=policy.epochs_per_batch,
                             generator=generator)
    c.progress.expect(len(plan), "optimizer steps")
    results = []
    for indices in plan:
        results.append(c.policy.train(batch.select(indices), c.loss_fn))
        c.progress.advance()
    return combine_optimizer_steps(results)


def refit(c: Components) -> None:
    """Stream the policy's HF-named weights into the generation engine, which wakes inside (refit_weights)."""
    refit_weights(c.policy, c.generation)


def update_rho(c: Components, retention: float | None) -> None:
    """The rho update (docs/design.md step 7); a CIPO run warns once when rho sits at a bound in most steps."""
    c.rho.update(retention)
    if not c.cfg.cipo.enabled:
        return
    warning = c.rho.count_step()
    if warning is not None:
        logger.warning(warning)


# ----------------------------------------------------------------------------------------------- metrics


def step_metrics(
    c: Components,
    rollouts: StepRollouts,
    batch: Batch,
    cipo_metrics: dict[str, float],
    train_metrics: dict[str, float],
) -> dict[str, float | None]:
    base = rollouts.base
    metrics: dict[str, float | None] = {
        "reward/base_mean": float(base["rewards"].mean()),
        "reward/base_pass_rate": float(is_success(base["rewards"]).float().mean()),
        "reward/prompts_all_correct": _share_of_groups(base, lambda r: bool(is_success(r).all())),
        "reward/prompts_all_wrong": _share_of_groups(base, lambda r: bool((~is_success(r)).all())),
        "reward/correction_mean": None,
        "tokens/generated": float(_response_tokens(base) + _response_tokens(rollouts.corrections)),
        "tokens/trained": float(batch.num_valid_tokens()),
        # prompt + response tokens per stream: what logprobs and train process (benchmarks/speed/step_speed.py per token)
        "tokens/base_sequence": float(_sequence_tokens(base)),
        "tokens/correction_sequence": float(_sequence_tokens(rollouts.corrections)),
        "response_length/base_mean": float(base["response_mask"].sum(dim=1).float().mean()),
        "cipo/anchors_dropped_too_long": float(rollouts.dropped_anchors),
        "cipo/rho_next": c.rho.rho,
        "cipo/correction_groups_live": correction_groups_live(batch),
        **rho_metrics(c),
        **cipo_metrics,  # cipo/anchors_*, cipo/correction_success, cipo/retention, cipo/rho (used this step)
        **{f"train/{k}": v for k, v in train_metrics.items()},
    }
    if rollouts.corrections is not None:
        metrics["reward/correction_mean"] = float(rollouts.corrections["rewards"].mean())
    for reason in sorted(set(batch["verifier_reason"])):
        metrics[f"verifier/{reason}"] = float(sum(r == reason for r in batch["verifier_reason"]))
    timings = c.timer.pop()
    metrics.update(timings)
    generation_seconds = timings.get("timing/rollout", 0.0) + timings.get("timing/correction_rollout", 0.0)
    metrics["throughput/generated_tokens_per_s"] = metrics["tokens/generated"] / max(generation_seconds, 1e-9)
    metrics["throughput/trained_tokens_per_s"] = metrics["tokens/trained"] / max(timings.get("timing/train", 0.0), 1e-9)
    return metrics


def correction_groups_live(batch: Batch) -> float | None:
    """Share of this step's correction groups with a non-zero advantage somewhere, i.e. that send a gradient
    (a group whose shaped rewards are all equal trains nothing); None without a correction stream."""
    groups = [indices for indices in batch.group_indices().values() if batch["sample_kind"][indices[0]] == "correction"]
    if not groups:
        return None
    return sum(bool(batch["advantages"][indices].abs().gt(0).any()) for indices in groups) / len(groups)


def rho_metrics(c: Components) -> dict[str, float | None]:
    """cipo/rho_at_bound: 1.0 when rho sits at rho.min or rho.max after this step's update, else 0.0;
    cipo/rho_tau: the retention target in use (null until tau: auto has measured retention). Null for GRPO."""
    if not c.cfg.cipo.enabled:
        return {"cipo/rho_at_bound": None, "cipo/rho_tau": None}
    return {"cipo/rho_at_bound": float(c.rho.at_bound), "cipo/rho_tau": c.rho.tau}


def _response_tokens(batch: Batch | None) -> int:
    return 0 if batch is None else batch.num_valid_tokens()


def _sequence_tokens(batch: Batch | None) -> int:
    return 0 if batch is None else int((batch["prompt_mask"] | batch["response_mask"]).sum())


def _share_of_groups(batch: Batch, predicate: Any) -> float:
    groups = batch.group_indices()
    hits = sum(predicate(batch["rewards"][indices]) for indices in groups.values())
    return hits / max(len(groups), 1)


# ----------------------------------------------------------------------------------------------- validation


def validate(c: Components, step: int) -> dict[str, float | None]:
    """The evaluation harness on the held-out set (single-turn prompts, as the paper evaluates): avg@n and pass@k."""
    val = c.cfg.validation
    context = EvalContext(generation_backend=c.generation, tokenizer=c.tokenizer, scorer=c.scorer, data=c.cfg.data,
                          correction=c.cfg.cipo,
                          generation=c.cfg.generation.model_copy(update={"temperature": val.temperature}),
                          max_model_len=c.cfg.policy.max_total_sequence_length)
    held_out = Benchmark(name="validation", kind="answer", items=c.validation_items, source="data.validation")
    results, _ = evaluate_benchmarks([held_out], context, n=val.samples_per_prompt, k_list=val.pass_k,
                                     max_items=None, seed=step_seed(c, step, 3))
    metrics = results["benchmarks"]["validation"]["metrics"]
    return {"val/reward_mean": metrics["avg"], **{f"val/pass@{k}": v for k, v in metrics["pass@k"].items()}}


# ----------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(c: Components, step: int, metrics: dict[str, float | None] | None = None) -> Path:
    """Policy (weights + optimizer, dist_checkpointing on Megatron) and trainer state, published atomically;
    the step's validation `metrics` go with it (they rank it for checkpointing.keep_best)."""

    def write(directory: Path) -> None:
        c.policy.save_checkpoint(directory / POLICY_DIR)
        torch.save(trainer_state(c, step), directory / TRAINER_STATE)
        (directory / "config.yaml").write_text(to_yaml(c.cfg))
        c.metrics.save_tracking_ids(directory)  # the W&B / MLflow runs a resume from here continues

    path = c.checkpoints.save(step, write, metrics=metrics)
    logger.info("checkpoint step %d -> %s", step, path)
    return path


def trainer_state(c: Components, step: int) -> dict[str, Any]:
    return {
        "step": step,
        "sampler": c.sampler.state_dict(),
        "rho": c.rho.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
    }


def maybe_resume(c: Components) -> None:
    """Continue from the run directory's latest complete checkpoint, else from `checkpointing.resume_from`
    (`resume_checkpoint`: stops on a changed model, cipo.enabled or layout unless `resume: force`)."""
    latest = resume_checkpoint(c.cfg)
    if latest is None:
        return
    state = torch.load(latest / TRAINER_STATE, weights_only=False)
    c.generation.sleep(level=2)  # a colocated engine frees the GPU for the load; the refit below refills it
    c.policy.load_checkpoint(latest / POLICY_DIR)
    c.sampler.load_state_dict(state["sampler"])
    c.rho.load_state_dict(state["rho"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    c.start_step = state["step"]
    refit(c)  # the engine still holds the initial weights
    logger.info("resumed from %s at step %d", latest, c.start_step)


def shutdown(c: Components) -> None:
    """Close workers inside their actors before anything else goes (vLLM leaves /dev/shm files otherwise)."""
    c.metrics.close()
    c.scorer.close()
    c.generation.shutdown()
    c.policy.shutdown()
    if c.cluster is not None:
        import ray

        c.cluster.shutdown()
        ray.shutdown()

