"""The CIPO training loop: one controller, one named function per stage, in the order of docs/design.md.

    rollout -> verify (-> more rounds: dynamic sampling) -> select anchors -> correction rollout
    -> verify corrections -> join -> shaped rewards and advantages -> logprobs -> train -> refit -> update rho

Only what carries gradient is computed: with loss.skip_zero_advantage (exact when no loss term survives A = 0),
samples whose advantage is 0 leave the pi_old and train passes and keep their share of the loss's normalizer.

GRPO is the same loop with `cipo.enabled: false` (the correction stages then do nothing). Differences from the
paper, whose exact choices are not public (docs/paper_reconstruction.md): the rho rule, the anchor
rounding and the templates are the reconstruction's defaults, all config keys.

The run around the step (the step loop, validation and checkpoint cadence, early stops) is `cipo_nemo/loop.py`.
With `async.enabled` the sampling stages of step s+1 run in the background while step s trains
(`cipo_nemo/async_loop.py` over `cipo_nemo/async_rollouts.py`, with the stages below).

Launch: `python -m cipo_nemo --config conf/X.yaml key=value` (one machine; Ray starts in-process);
on a Slurm cluster the same entry point runs on the Ray head (slurm/).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cipo_nemo.algorithms.anchors import AnchorSelection, select_anchors
from cipo_nemo.algorithms.correction import join_streams
from cipo_nemo.algorithms.dynamic_sampling import SampledRound, assemble_rounds, live_group_count
from cipo_nemo.algorithms.loss import PolicyLoss, build_loss
from cipo_nemo.algorithms.rewards import is_success
from cipo_nemo.algorithms.rho import RhoController
from cipo_nemo.algorithms.rollout_metrics import rollout_metrics, verifier_counts
from cipo_nemo.algorithms.training_signal import carries_gradient, correction_groups_live, training_signal
from cipo_nemo.async_rollouts import RolloutPipeline
from cipo_nemo.config import MasterConfig, to_yaml
from cipo_nemo.data.batch import Batch
from cipo_nemo.data.correction_prompts import render_correction_prompt
from cipo_nemo.data.frozen_attempts import anchor_attempts
from cipo_nemo.data.prompts import (
    encode_prompts,
    indices_within_budget,
    load_prompts,
    prompt_token_budget,
    render_prompt,
)
from cipo_nemo.data.sampler import PromptSampler
from cipo_nemo.data.sources import TaskItem
from cipo_nemo.environments.scoring import TaskScorer
from cipo_nemo.eval.benchmarks import Benchmark
from cipo_nemo.eval.harness import EvalContext, evaluate_benchmarks
from cipo_nemo.eval.registry import load_registered_benchmark
from cipo_nemo.eval.report import average_summary
from cipo_nemo.models.factory import build_cluster, build_generation, build_policy, build_tokenizer, needs_ray
from cipo_nemo.models.interfaces import GenerationBackend, PolicyBackend, SamplingSettings
from cipo_nemo.models.policy.microbatches import (
    OptimizerStep,
    plan_optimizer_steps,
    take_optimizer_steps,
    trained_per_stream,
)
from cipo_nemo.models.refit.transfer import build_refit_transport, refit_weights
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
    validation_sets: dict[str, list[TaskItem]]  # "validation" (data.validation) and each validation.benchmarks name
    sampler: PromptSampler
    scorer: TaskScorer
    policy: PolicyBackend
    generation: GenerationBackend
    loss_fn: PolicyLoss
    rho: RhoController
    metrics: MetricsLogger
    checkpoints: CheckpointManager
    cluster: Any  # the Ray virtual cluster, or None when every backend runs in this process
    refit_transport: Any = None  # models/refit: file, ipc or broadcast, chosen once by setup
    timer: StageTimer = field(default_factory=StageTimer)
    progress: StepProgress = field(default_factory=StepProgress)
    start_step: int = 0
    pipeline: RolloutPipeline | None = None  # async.enabled: batches sampled ahead (cipo_nemo/async_loop.py)
    resumed_batch: dict[str, Any] | None = None  # async: the checkpoint's batch sampled ahead, for the pipeline

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
    sampling_metrics: dict[str, float]  # dynamic_sampling/* (empty without it)
    rho: float  # the rho the anchors were chosen with (known when the batch was sampled)


# Streams of the per-step seeds (step_seed): each draw of a step has its own.
SEED_BASE, SEED_ANCHORS, SEED_CORRECTIONS, SEED_VALIDATION, SEED_MINI_BATCHES, SEED_FROZEN_ATTEMPTS = 0, 1, 2, 3, 4, 5
SEED_BASE_ROUND = 100  # + r: round r >= 1 of dynamic sampling (round 0 is SEED_BASE, as without it)
QUICK_SHUTDOWN_S = 5.0  # an engine busy with a call the run no longer waits for: then its actor is killed


# ----------------------------------------------------------------------------------------------- setup


def setup(cfg: MasterConfig, loaded_items: dict[str, list[TaskItem]] | None = None) -> Components:
    """Build every component (data, scorer, workers, loss, logger) and resume from a checkpoint if asked.

    `loaded_items` (split -> items) are the preflight's: the data sources are then not read a second time.
    `policy.offload_optimizer_for_generation` comes resolved by the launch plan (`python -m cipo_nemo`); an `auto`
    left unresolved means no (the plan says yes only where a GPU budget does not fit otherwise)."""
    run_dir = Path(cfg.run.output_dir)
    resume_checkpoint(cfg)  # a checkpoint of another setup stops the run here, before any worker starts
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    tokenizer = build_tokenizer(cfg.policy, chat_template=cfg.data.chat_template)
    loaded_items = loaded_items or {}
    # prompts first: a data set with nothing that fits data.max_prompt_tokens stops here, before Ray and workers
    train_items = load_prompts(cfg, tokenizer, split="train", items=loaded_items.get("train"))
    validation_sets = load_validation_sets(cfg, tokenizer, loaded_items)
    cluster = build_cluster(cfg) if needs_ray(cfg) else None
    policy = build_policy(cfg, cluster)
    if offloads_optimizer(cfg):
        policy.offload_optimizer()  # before the engine starts and takes its share of the GPU
    components = Components(
        cfg=cfg,
        run_dir=run_dir,
        tokenizer=tokenizer,
        train_items=train_items,
        validation_sets={name: items[: cfg.validation.max_items] for name, items in validation_sets.items()},
        sampler=PromptSampler(train_items, batch_size=cfg.grpo.prompts_per_step, seed=cfg.run.seed,
                              shuffle=cfg.data.shuffle),
        scorer=TaskScorer(verifier=cfg.verifier),
        policy=policy,
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
    connect_refit(components)
    maybe_resume(components)
    return components


def load_validation_sets(cfg: MasterConfig, tokenizer: Any,
                         loaded_items: dict[str, list[TaskItem]]) -> dict[str, list[TaskItem]]:
    """data.validation (as "validation") and each named benchmark of validation.benchmarks, without prompts over
    data.max_prompt_tokens; the preflight's items when it loaded them."""
    sets = {}
    if cfg.data.validation is not None:
        sets["validation"] = load_prompts(cfg, tokenizer, split="validation", items=loaded_items.get("validation"))
    for name in cfg.validation.benchmarks:
        items = loaded_items.get(f"benchmark:{name}")
        if items is None:
            items = load_registered_benchmark(name, fetch=False).items
        sets[name] = load_prompts(cfg, tokenizer, split=name, items=items)
    return sets


# ----------------------------------------------------------------------------------------------- the step


def cipo_step(c: Components, step: int) -> dict[str, float | None]:
    """One CIPO (or GRPO) step, the synchronous way (async.enabled: cipo_nemo/async_loop.py); returns its metrics."""
    rollouts = sample_rollouts(c, step, rho=c.rho.rho)
    c.generation.sleep(level=2)  # the refit below overwrites every weight: nothing to offload to host memory
    batch, cipo_metrics, train_metrics = train_on_rollouts(c, rollouts, step)
    with c.timer.time("refit"):
        refit(c)
    update_rho(c, cipo_metrics.retention)
    return step_metrics(c, rollouts, batch, cipo_metrics.as_dict(), train_metrics)


def sample_rollouts(c: Components, step: int, *, rho: float) -> StepRollouts:
    """The sampling stages: base stream, anchors (chosen with `rho`), correction stream, all from the engine's
    current weights."""
    timer = c.timer
    items, base, sampling_metrics = sample_base_stream(c, step, rho=rho)
    with timer.time("select_anchors"):
        anchors = maybe_select_anchors(c, base, step, rho=rho)
    with timer.time("correction_rollout"):
        corrections, dropped = correction_rollout(c, base, anchors, items, step)
    with timer.time("verify_corrections"):
        if corrections is not None:
            verify(c, corrections, items)
    return StepRollouts(items, base, anchors, corrections, dropped, sampling_metrics, rho)


def train_on_rollouts(c: Components, rollouts: StepRollouts, step: int, *, off_policy: bool = False) -> tuple:
    """Join, advantages, logprobs, train: returns (batch, the join's CIPO metrics, the train metrics)."""
    timer = c.timer
    with timer.time("join"):
        joined, cipo_metrics = join_streams(rollouts.base, rollouts.corrections, anchors=rollouts.anchors,
                                            rho=rollouts.rho)
    with timer.time("advantages"):
        batch = compute_advantages(c, joined)
    with timer.time("dump_samples"):
        maybe_dump_samples(c, rollouts, batch, step)
    plan = plan_training(c, batch, step)
    with timer.time("logprobs"):
        compute_logprobs(c, batch, plan, off_policy=off_policy)
    with timer.time("train"):
        train_metrics = train_policy(c, batch, plan)
    return batch, cipo_metrics, train_metrics


def step_seed(c: Components, step: int, stream: int) -> int:
    # Derived, not drawn: a resumed run samples exactly what the uninterrupted run would have.
    return (c.cfg.run.seed * 1_000_003 + step * 101 + stream) % (2**31)


def sample_base_stream(c: Components, step: int, *, rho: float) -> tuple[list[TaskItem], Batch, dict[str, float]]:
    """B prompts x G samples, scored. With grpo.dynamic_sampling, further rounds of B prompts until B groups carry
    gradient (up to max_rounds; algorithms/dynamic_sampling.py decides which groups form the batch)."""
    dynamic = c.cfg.grpo.dynamic_sampling
    rounds: list[SampledRound] = []
    while not rounds or (dynamic.enabled and len(rounds) < dynamic.max_rounds
                         and live_group_count(rounds) < c.cfg.grpo.prompts_per_step):
        items = c.sampler.next_batch()
        with c.timer.time("rollout"):
            base = rollout(c, items, step, seed_stream=SEED_BASE if not rounds else SEED_BASE_ROUND + len(rounds))
        with c.timer.time("verify"):
            verify(c, base, items)
        if not dynamic.enabled:
            return items, base, {}
        rounds.append(SampledRound(items, base, live_groups=groups_with_gradient(c, base, rho=rho)))
    items, base, stats = assemble_rounds(rounds, prompts_per_step=c.cfg.grpo.prompts_per_step)
    if stats.groups_short:
        logger.warning("step %d: dynamic sampling found %d of %d prompt groups with a non-zero advantage in %d "
                       "rounds; training on those", step, stats.groups_live, c.cfg.grpo.prompts_per_step,
                       stats.rounds)
    return items, base, stats.as_dict()


def groups_with_gradient(c: Components, base: Batch, *, rho: float) -> set[int]:
    """The base groups that carry gradient, by the very math the step trains with (`training_signal`)."""
    joined, _ = join_streams(base, None, anchors=None, rho=rho)
    signal = compute_advantages(c, joined)
    return set(signal["group_id"][carries_gradient(signal)].tolist())


def rollout(c: Components, items: list[TaskItem], step: int, *, seed_stream: int = SEED_BASE) -> Batch:
    """Base stream: G samples per prompt from the current policy."""
    cfg = c.cfg
    rendered = [render_prompt(item, tokenizer=c.tokenizer, instructions=cfg.data.instructions,
                              template_kwargs=cfg.data.chat_template_kwargs,
                              system_prompt=cfg.data.system_prompt) for item in items]
    prompt_ids = encode_prompts(rendered, tokenizer=c.tokenizer)
    settings = SamplingSettings.from_config(cfg.generation, n=cfg.grpo.samples_per_prompt,
                                            seed=step_seed(c, step, seed_stream))
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


def maybe_select_anchors(c: Components, base: Batch, step: int, *, rho: float) -> AnchorSelection | None:
    """Difficulty-aware anchors (paper section 3.3), a share `rho` of them successful: none for GRPO."""
    correction = c.cfg.cipo
    if not correction.enabled:
        return None
    generator = torch.Generator().manual_seed(step_seed(c, step, SEED_ANCHORS))
    return select_anchors(base["rewards"], base["group_id"], rho=rho,
                          max_anchors_per_step=correction.max_anchors_per_step,
                          difficulty_low=correction.difficulty_low, difficulty_high=correction.difficulty_high,
                          allow_out_of_window=correction.allow_out_of_window, generator=generator,
                          truncated=[reason == "length" for reason in base["finish_reason"]])


def correction_rollout(
    c: Components, base: Batch, anchors: AnchorSelection | None, items: list[TaskItem], step: int
) -> tuple[Batch | None, int]:
    """Correction stream: G_c samples per correction prompt (problem + the anchor attempt), same pi_old."""
    if anchors is None or len(anchors) == 0:
        return None, 0
    cfg = c.cfg
    attempts = anchor_attempts(cfg.cipo, own=[base["response_text"][i] for i in anchors.indices],
                               item_ids=[items[base["item_index"][i]].id for i in anchors.indices],
                               anchor_correct=anchors.anchor_correct, is_success=is_success,
                               seed=step_seed(c, step, SEED_FROZEN_ATTEMPTS))
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
    settings = SamplingSettings.from_config(cfg.generation, n=cfg.cipo.samples_per_anchor,
                                            seed=step_seed(c, step, SEED_CORRECTIONS))
    responses = generate(c, prompt_ids, settings)
    item_indices = [base["item_index"][anchors.indices[p]] for p in kept_anchor_positions]
    corrections = responses_to_batch(prompt_ids, responses, item_indices=item_indices, sample_kind="correction",
                                     tokenizer=c.tokenizer)
    # anchor_index: position in anchors.indices of the anchor each correction answers
    corrections["anchor_index"] = torch.tensor([kept_anchor_positions[g] for g in corrections["group_id"].tolist()],
                                               dtype=torch.long)
    return corrections, len(anchors) - len(kept_anchor_positions)


def compute_advantages(c: Components, joined: Batch) -> Batch:
    """Shaped rewards and advantages of both streams, each applied once (algorithms/training_signal.py): the risk
    penalty on corrections, the overlong punishment, GRPO per prompt group for the base stream and
    `cipo.advantage_mode` for corrections; responses cut at max_new_tokens leave the loss with grpo.mask_truncated."""
    cfg = c.cfg
    batch = training_signal(joined, grpo=cfg.grpo, cipo=cfg.cipo, max_new_tokens=cfg.generation.max_new_tokens)
    batch["carries_gradient"] = carries_gradient(batch)
    return batch


def maybe_dump_samples(c: Components, rollouts: StepRollouts, batch: Batch, step: int) -> None:
    """Every logger.samples_every steps: samples/step_<N>.jsonl, what both streams train on (cipo_nemo/samples.py)."""
    every = c.cfg.logger.samples_every
    if every and step % every == 0:
        records = sample_records(batch, rollouts.anchors, items=rollouts.items, tokenizer=c.tokenizer, step=step)
        write_samples(c.run_dir, step, records)
        c.metrics.log_samples(step, records)  # a table in W&B / MLflow when configured


def plan_training(c: Components, batch: Batch, step: int) -> list[OptimizerStep]:
    """The step's optimizer steps: `policy.epochs_per_batch` passes over the samples in shuffled mini-batches of
    `policy.train_global_batch_size`, drawn over every sample; with loss.skip_zero_advantage each keeps only the
    samples that carry gradient and the normalizer it had with all of them (microbatches.plan_optimizer_steps)."""
    policy = c.cfg.policy
    generator = torch.Generator().manual_seed(step_seed(c, step, SEED_MINI_BATCHES))
    live = batch["carries_gradient"] if c.cfg.loss.skips_zero_advantage() else None
    return plan_optimizer_steps(batch, c.loss_fn, size=policy.train_global_batch_size,
                                epochs=policy.epochs_per_batch, generator=generator, carries_gradient=live)


def compute_logprobs(c: Components, batch: Batch, plan: list[OptimizerStep], *, off_policy: bool = False) -> None:
    """pi_old (the trainer's recompute of the sampled tokens) when it can differ from the policy being trained,
    for the samples the plan trains only, and, for the KL term, the reference policy."""
    if needs_old_logprobs(c, len(batch), off_policy=off_policy):
        trained = sorted({i for planned in plan for i in planned.indices})
        old_logprobs = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
        if trained:
            old_logprobs[trained] = c.policy.get_logprobs(batch.select(trained)).float()
        batch["old_logprobs"] = old_logprobs
    if c.cfg.loss.kl_beta > 0:
        batch["reference_logprobs"] = c.policy.get_reference_logprobs(batch)


def needs_old_logprobs(c: Components, num_samples: int, *, off_policy: bool = False) -> bool:
    """A separate pi_old pass, unless one optimizer step sees the whole batch (pi_old is then the policy being
    trained: the loss takes it from the training forward pass, detached) and neither the KL term nor importance
    sampling asks for the recompute, and the batch is on-policy (an older version's batch always gets its pi_old
    recomputed by the trainer: what the engine's logprobs are compared with)."""
    policy, loss = c.cfg.policy, c.cfg.loss
    one_step = policy.epochs_per_batch == 1 and (policy.train_global_batch_size or num_samples) >= num_samples
    return not one_step or loss.kl_beta > 0 or loss.importance_sampling or off_policy


def train_policy(c: Components, batch: Batch, plan: list[OptimizerStep]) -> dict[str, float]:
    """One optimizer step per planned mini-batch (`plan_training`), each with its own global loss denominator;
    pi_old stays the rollout policy's (computed once, before the first step), so from the second step on the
    ratio pi / pi_old moves away from 1 and the clip ranges bind. A mini-batch none of whose samples carries
    gradient takes no optimizer step (its learning-rate tick still passes), and the step line says so."""
    c.progress.expect(len(plan), "optimizer steps")
    with optimizer_state_for_training(c):
        metrics = take_optimizer_steps(c.policy, batch, plan, c.loss_fn, after_each=c.progress.advance)
    # seq-mask-tis: the share of the trained sequences whose importance weights were masked
    masked_share = metrics.get("is_masked_sequences", 0.0) / max(metrics.get("num_valid_sequences", 0.0), 1.0)
    return metrics | {"is_masked_sequence_fraction": masked_share} | trained_per_stream(batch, plan)


def offloads_optimizer(cfg: MasterConfig) -> bool:
    return cfg.policy.offload_optimizer_for_generation is True  # `auto` as the launch plan resolved it, or no


@contextmanager
def optimizer_state_for_training(c: Components) -> Iterator[None]:
    """With `policy.offload_optimizer_for_generation` the optimizer's state lives in host memory except in here:
    back on the device for the optimizer steps (vLLM sleeps), out again before the refit wakes the engine (NeMo-RL's
    colocated order)."""
    if offloads_optimizer(c.cfg):
        c.policy.restore_optimizer()
    try:
        yield
    finally:
        if offloads_optimizer(c.cfg):
            c.policy.offload_optimizer()


def connect_refit(c: Components) -> None:
    """The refit transport to the current engines (broadcast: a process group with their workers, made again for
    engines that replace dead ones, cipo_nemo/async_loop.py)."""
    c.refit_transport = build_refit_transport(c.cfg.refit, c.policy, c.generation, on_gpu=torch.cuda.is_available(),
                                              colocated=c.cfg.generation.colocated)


def refit(c: Components) -> None:
    """Move the policy's HF-named weights into the generation engine, which wakes inside (refit_weights)."""
    refit_weights(c.policy, c.generation, c.refit_transport)


def update_rho(c: Components, retention: float | None) -> None:
    """The rho update (docs/design.md step 7); a CIPO run warns once when rho sits at a bound in most steps."""
    c.rho.update(retention)
    if not c.cfg.cipo.enabled:
        return
    warning = c.rho.count_step()
    if warning is not None:
        logger.warning(warning)


def shutdown_generation(c: Components, *, quick: bool) -> None:
    """Close the refit transport and the engines; `quick`: an engine in the middle of a call (dead, stalled, or
    sampling while the run fails) gets QUICK_SHUTDOWN_S to close inside its actor before the actor is killed."""
    if c.refit_transport is not None:
        c.refit_transport.close()
        c.refit_transport = None
    c.generation.shutdown(timeout_s=QUICK_SHUTDOWN_S if quick else None)


# ----------------------------------------------------------------------------------------------- metrics


def step_metrics(
    c: Components,
    rollouts: StepRollouts,
    batch: Batch,
    cipo_metrics: dict[str, float],
    train_metrics: dict[str, float],
    sampling_timings: dict[str, float] | None = None,
) -> dict[str, float | None]:
    discarded = rollouts.sampling_metrics.get("dynamic_sampling/tokens_discarded", 0.0)
    metrics: dict[str, float | None] = {
        **rollout_metrics(rollouts.base, rollouts.corrections, tokens_discarded=discarded),
        "tokens/trained": float(batch.num_valid_tokens()),  # response tokens in the loss's normalizer
        "cipo/anchors_dropped_too_long": float(rollouts.dropped_anchors),
        "cipo/rho_next": c.rho.rho,
        "cipo/correction_groups_live": correction_groups_live(batch),
        **rho_metrics(c),
        **cipo_metrics,  # cipo/anchors_*, cipo/correction_success, cipo/retention, cipo/rho (used this step)
        **{f"train/{k}": v for k, v in train_metrics.items()},
        **rollouts.sampling_metrics,
        **verifier_counts(batch),
    }
    timings = c.timer.pop() | (sampling_timings or {})  # async: sampled in the background, not in timing/step
    metrics.update(timings)
    generation_seconds = timings.get("timing/rollout", 0.0) + timings.get("timing/correction_rollout", 0.0)
    metrics["throughput/generated_tokens_per_s"] = metrics["tokens/generated"] / max(generation_seconds, 1e-9)
    computed = sum(metrics[f"train/tokens_trained/{stream}"] for stream in ("base", "correction"))
    metrics["throughput/trained_tokens_per_s"] = computed / max(timings.get("timing/train", 0.0), 1e-9)
    return metrics


def rho_metrics(c: Components) -> dict[str, float | None]:
    """cipo/rho_at_bound: 1.0 when rho sits at rho.min or rho.max after this step's update, else 0.0;
    cipo/rho_tau: the retention target in use (null until tau: auto has measured retention). Null for GRPO."""
    if not c.cfg.cipo.enabled:
        return {"cipo/rho_at_bound": None, "cipo/rho_tau": None}
    return {"cipo/rho_at_bound": float(c.rho.at_bound), "cipo/rho_tau": c.rho.tau}


# ----------------------------------------------------------------------------------------------- validation


def validate(c: Components, step: int) -> dict[str, float | None]:
    """The evaluation harness on the held-out sets (single-turn prompts, as the paper evaluates): avg@n and pass@k.
    val/* is the average over the sets (data.validation alone: its own numbers); with named benchmarks each set
    also logs val/<name>/*, as the paper's table has a column per benchmark and their average."""
    val = c.cfg.validation
    if c.pipeline is not None:
        c.pipeline.engine_current()  # the batch sampled ahead finishes, the engine gets this step's weights
    context = EvalContext(generation_backend=c.generation, tokenizer=c.tokenizer, scorer=c.scorer, data=c.cfg.data,
                          correction=c.cfg.cipo,
                          generation=c.cfg.generation.model_copy(update={"temperature": val.temperature}),
                          max_model_len=c.cfg.policy.max_total_sequence_length)
    held_out = [Benchmark(name=name, kind="answer", items=items, source=name)
                for name, items in c.validation_sets.items()]
    results, _ = evaluate_benchmarks(held_out, context, n=val.samples_per_prompt, k_list=val.pass_k,
                                     max_items=None, seed=step_seed(c, step, SEED_VALIDATION))
    per_set = {name: record["metrics"] for name, record in results["benchmarks"].items()}
    metrics = _validation_metrics("val", average_summary(list(per_set.values()), k_list=val.pass_k))
    if val.benchmarks:
        for name, summary in per_set.items():
            metrics.update(_validation_metrics(f"val/{name}", summary))
    return metrics


def _validation_metrics(prefix: str, summary: dict[str, Any]) -> dict[str, float | None]:
    return {f"{prefix}/reward_mean": summary["avg"], **{f"{prefix}/pass@{k}": v for k, v in summary["pass@k"].items()}}


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
    # async first: it waits for the batch in flight, whose sampling moves the prompt sampler (and, on the HF
    # backend, forks the RNG in its thread)
    sampled_ahead = c.pipeline.state_dict() if c.pipeline is not None else None
    return {
        "step": step,
        "sampler": c.sampler.state_dict(),
        "rho": c.rho.state_dict(),
        "async": sampled_ahead,
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
    with optimizer_state_for_training(c):  # the state loads into the tensors the next optimizer step uses
        c.policy.load_checkpoint(latest / POLICY_DIR)
    c.sampler.load_state_dict(state["sampler"])
    c.rho.load_state_dict(state["rho"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    c.start_step = state["step"]
    c.resumed_batch = state.get("async")  # async: the batch sampled ahead of step start_step + 1 (async_loop.py)
    refit(c)  # the engine still holds the initial weights
    logger.info("resumed from %s at step %d", latest, c.start_step)


def shutdown(c: Components) -> None:
    """Close workers inside their actors before anything else goes (vLLM leaves /dev/shm files otherwise)."""
    c.metrics.close()
    c.scorer.close()
    shutdown_generation(c, quick=c.pipeline is not None and c.pipeline.busy())
    c.policy.shutdown()
    if c.cluster is not None:
        import ray

        c.cluster.shutdown()
        ray.shutdown()

