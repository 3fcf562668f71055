"""The evaluation harness: n samples per problem from a model, scored, aggregated into avg@n, pass@k and, for
correction benchmarks, correction success (wrong -> right) and retention (right -> right).

Prompts are built exactly as in training: `render_prompt` (problem + the family's instruction, through the
tokenizer's chat template) for answer benchmarks, and the trainer's correction template (`render_correction_prompt`
with ``cipo.templates``) for correction benchmarks. Responses are decoded by the same
`responses_to_batch` and scored by the same `TaskScorer` (math verifier pool, code sandbox) as rollouts.

Two entry points:

- :func:`evaluate`: a model directory (or a training run directory or checkpoint, or an offline hub id) -> builds its own
  generation backend (``generation.backend``: vllm or hf), tokenizer and scorer, evaluates, shuts them down.
- :func:`evaluate_benchmarks`: the same evaluation with components that already exist (the trainer's generation
  workers, tokenizer and scorer), which is how training-time validation can run it.

A prompt longer than ``max_model_len - generation.max_new_tokens`` tokens is dropped, counted and logged (the
trainer's rule for correction prompts), so that every kept problem has the full response budget.
"""

from __future__ import annotations

import logging
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cipo_nemo.algorithms.rewards import SUCCESS_THRESHOLD
from cipo_nemo.config import MasterConfig
from cipo_nemo.config.schema import CorrectionConfig, DataConfig, GenerationConfig
from cipo_nemo.data.correction_prompts import render_correction_prompt
from cipo_nemo.data.prompts import (
    encode_prompts,
    indices_within_budget,
    prompt_token_budget,
    render_prompt,
    use_chat_template_file,
)
from cipo_nemo.data.sources import DataError
from cipo_nemo.environments.scoring import TaskScorer
from cipo_nemo.eval.benchmarks import Benchmark, check_unique_names, load_benchmark
from cipo_nemo.eval.report import answer_average, num_correct, summarize, summarize_correction, write_results
from cipo_nemo.models.hub import ModelNotFoundError, resolve_model_dir
from cipo_nemo.models.interfaces import GenerationBackend, SamplingSettings
from cipo_nemo.models.rollout import responses_to_batch
from cipo_nemo.utils.checkpoint import CHECKPOINTS_DIR, COMPLETE_MARKER

logger = logging.getLogger(__name__)

# A training run directory (cipo_nemo/trainer.py): its resolved config and its final policy as an HF
# directory. Named here, not imported: the trainer sits above eval/ and imports this module for validation.
RUN_CONFIG_FILE = "config.yaml"
RUN_HF_MODEL_DIR = "hf_model"
_ANSWER_STREAM, _CORRECTION_STREAM = 0, 1


class EvalError(ValueError):
    """An evaluation that cannot run as asked (model, k, n); the message says what to change."""


@dataclass(frozen=True)
class EvalContext:
    """What evaluating needs besides the benchmarks: the sampler, its tokenizer, the scorer and the config
    sections that shape prompts (``data``: instructions and system prompt; ``correction``: ``cipo`` templates,
    attempt budget, thinking removal) and sampling (``generation``)."""

    generation_backend: GenerationBackend
    tokenizer: Any
    scorer: TaskScorer
    data: DataConfig
    correction: CorrectionConfig
    generation: GenerationConfig
    max_model_len: int


# ---------------------------------------------------------------------------------------------- entry points


def evaluate(
    model_dir: str | Path,
    benchmarks: Sequence[str | Benchmark],
    *,
    cfg: MasterConfig,
    n: int,
    k_list: Sequence[int],
    max_items: int | None = None,
    seed: int = 0,
    output_dir: Path | None = None,
) -> dict[str, Any]:
    """Evaluate a model on benchmarks (specs as in cipo_nemo/eval/benchmarks.py, or loaded `Benchmark`s).

    Uses ``cfg.data`` (instructions, system prompt), ``cfg.cipo`` (correction templates), ``cfg.generation``
    (backend and sampling), ``cfg.verifier`` and ``cfg.policy.max_total_sequence_length`` (the context length).
    Everything that can be checked without the model (k, n, the model's path, every benchmark) is checked
    before the model is loaded. With `output_dir`, writes results.json, samples.jsonl and pass_at_k.png there.
    Returns the results (see `evaluate_benchmarks`) with the resolved ``model`` path, and with `output_dir` the
    written ``files`` by kind (results.json does not list itself).
    """
    k_list = check_k_list(k_list, n=n)
    model_path = resolve_eval_model(model_dir)
    resolved = [load_benchmark(spec) if isinstance(spec, str) else spec for spec in benchmarks]
    check_unique_names(resolved)
    from cipo_nemo.models.generation import build_generation_backend  # lazy: the backends import vllm/transformers
    from transformers import AutoTokenizer

    tokenizer = use_chat_template_file(AutoTokenizer.from_pretrained(model_path), cfg.data.chat_template)
    scorer = TaskScorer(verifier=cfg.verifier)
    backend = None
    try:
        backend = build_generation_backend(model_dir=model_path, generation=cfg.generation,
                                           max_model_len=cfg.policy.max_total_sequence_length, seed=seed)
        context = EvalContext(generation_backend=backend, tokenizer=tokenizer, scorer=scorer, data=cfg.data,
                              correction=cfg.cipo, generation=cfg.generation,
                              max_model_len=cfg.policy.max_total_sequence_length)
        results, samples = evaluate_benchmarks(resolved, context, n=n, k_list=k_list, max_items=max_items, seed=seed)
    finally:
        if backend is not None:
            backend.shutdown()
        scorer.close()
    results = {"model": str(model_path), **results}
    if output_dir is not None:
        results["files"] = {kind: str(path) for kind, path in write_results(results, samples, output_dir).items()}
    return results


def evaluate_benchmarks(
    benchmarks: Sequence[Benchmark],
    context: EvalContext,
    *,
    n: int,
    k_list: Sequence[int],
    max_items: int | None,
    seed: int,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate with existing components. Returns (results, samples).

    ``results``: ``n``, ``k``, ``seed``, ``max_items``, ``max_model_len``, ``generation`` (the sampling config)
    and ``benchmarks`` (name -> :func:`evaluate_benchmark`'s record). ``samples``: one record per problem with its
    rendered prompt, responses, rewards and verifier reasons (samples.jsonl).
    """
    k_list = check_k_list(k_list, n=n)
    if max_items is not None and max_items < 1:
        raise EvalError(f"max_items must be >= 1 (or None for every problem), got {max_items}")
    results: dict[str, Any] = {
        "n": n, "k": k_list, "seed": seed, "max_items": max_items, "max_model_len": context.max_model_len,
        "generation": context.generation.model_dump(mode="json"), "benchmarks": {},
    }
    samples: list[dict[str, Any]] = []
    for benchmark in benchmarks:
        record, benchmark_samples = evaluate_benchmark(benchmark.head(max_items), context, n=n, k_list=k_list,
                                                       seed=seed)
        results["benchmarks"][benchmark.name] = record
        samples += benchmark_samples
    results["average"] = answer_average(results)
    return results, samples


# ---------------------------------------------------------------------------------------------- checks


def check_k_list(k_list: Sequence[int], *, n: int) -> list[int]:
    """The k values, sorted and unique; each must satisfy 1 <= k <= n."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise EvalError(f"n must be an integer >= 1, got {n!r}")
    if not k_list:
        raise EvalError("no k given for pass@k")
    for k in k_list:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise EvalError(f"k must be an integer >= 1, got {k!r}")
        if k > n:
            raise EvalError(f"k={k} is larger than n={n} samples per problem; pass@k needs k <= n")
    return sorted(set(k_list))


def resolve_eval_model(model: str | Path) -> Path:
    """An HF checkpoint directory from an HF directory, a training run directory (its hf_model/), a training
    checkpoint (RUN_DIR/checkpoints/step_N: exported once into the cache, checkpoint_export.py) or a hub id in the
    offline cache."""
    path = Path(model).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        if is_training_checkpoint(path):
            from cipo_nemo.models.policy.checkpoint_export import ExportError, cached_export  # imports torch

            try:
                return cached_export(path)
            except ExportError as error:
                raise EvalError(f"--model: {error}") from None
        if (path / RUN_CONFIG_FILE).is_file():
            hf_model = path / RUN_HF_MODEL_DIR
            if not (hf_model / "config.json").is_file():
                raise EvalError(f"--model: training run {path} has no {RUN_HF_MODEL_DIR}/ (the run did not finish, "
                                "or ran with checkpointing.save_hf_at_end=false); evaluate one of its "
                                f"{CHECKPOINTS_DIR}/step_N instead")
            return hf_model.resolve()
    try:
        return resolve_model_dir(str(model))
    except ModelNotFoundError as error:  # its message names the training config key; here the flag is meant
        raise EvalError("--model: " + str(error).removeprefix("policy.model_name: ")) from None


def is_training_checkpoint(path: Path) -> bool:
    """A checkpoint directory (complete or not): a step_N directory of a run's checkpoints/, or one with the marker."""
    return (path / COMPLETE_MARKER).is_file() or (path.parent.name == CHECKPOINTS_DIR and path.name.startswith("step_"))


def run_config_of(model: str | Path) -> Path | None:
    """The config.yaml of a training run directory or of a training checkpoint, else None."""
    path = Path(model).expanduser()
    config = path / RUN_CONFIG_FILE
    is_run = path.is_dir() and config.is_file() and ((path / RUN_HF_MODEL_DIR).is_dir() or is_training_checkpoint(path))
    return config if is_run else None


# ---------------------------------------------------------------------------------------------- one benchmark


def evaluate_benchmark(
    benchmark: Benchmark, context: EvalContext, *, n: int, k_list: Sequence[int], seed: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """n samples per problem of one benchmark, scored and summarized; returns (record, samples)."""
    labels: list[dict[str, Any]] = []
    if benchmark.kind == "correction":
        labels = judge_given_solutions(benchmark, context.scorer)
        prompts = [render_correction_prompt(item, attempt, tokenizer=context.tokenizer, data=context.data,
                                            correction=context.correction, template=benchmark.template_of(index))
                   for index, (item, attempt) in enumerate(zip(benchmark.items, benchmark.attempts))]
    else:
        prompts = [render_prompt(item, tokenizer=context.tokenizer, instructions=context.data.instructions,
                                 template_kwargs=context.data.chat_template_kwargs,
                                 system_prompt=context.data.system_prompt) for item in benchmark.items]
    stream = _CORRECTION_STREAM if benchmark.kind == "correction" else _ANSWER_STREAM
    kept, outcomes = sample_and_score(benchmark, prompts, context, n=n,
                                      seed=benchmark_seed(seed, benchmark.name, stream))
    problems, samples = [], []
    for index, outcome in zip(kept, outcomes):
        problem = {"id": benchmark.items[index].id, "origin": benchmark.items[index].origin, **outcome["scores"]}
        if labels:
            problem.update(labels[index])
        problems.append(problem)
        samples.append({"benchmark": benchmark.name, "id": problem["id"], "prompt": prompts[index],
                        "responses": outcome["responses"], **outcome["scores"]})
    record = benchmark_record(benchmark, problems, dropped=len(prompts) - len(kept), n=n, k_list=k_list)
    return record, samples


def judge_given_solutions(benchmark: Benchmark, scorer: TaskScorer) -> list[dict[str, Any]]:
    """Per problem: is the given solution correct, and who said so (the row's label, else the verifier)."""
    unlabelled = [i for i, label in enumerate(benchmark.attempt_correct) if label is None]
    verdicts: dict[int, tuple[bool, str]] = {}
    if unlabelled:
        scores = scorer.score([benchmark.items[i] for i in unlabelled], [benchmark.attempts[i] for i in unlabelled])
        verdicts = {i: (reward > SUCCESS_THRESHOLD, reason)
                    for i, reward, reason in zip(unlabelled, scores.rewards, scores.reasons)}
    judged = []
    for index, label in enumerate(benchmark.attempt_correct):
        if label is not None:
            judged.append({"solution_correct": label, "solution_judged_by": "label"})
        else:
            correct, reason = verdicts[index]
            judged.append({"solution_correct": correct, "solution_judged_by": "verifier", "solution_reason": reason})
    return judged


def sample_and_score(
    benchmark: Benchmark, prompts: Sequence[str], context: EvalContext, *, n: int, seed: int
) -> tuple[list[int], list[dict[str, Any]]]:
    """Generate n responses for every prompt that fits and score them. Returns the kept problem indices and,
    per kept problem, ``{"responses": [...], "scores": {"rewards", "reasons", "correct", "truncated"}}``."""
    prompt_ids = encode_prompts(prompts, tokenizer=context.tokenizer)
    try:
        budget = prompt_token_budget(max_total_sequence_length=context.max_model_len,
                                     max_new_tokens=context.generation.max_new_tokens)
    except DataError as err:
        raise EvalError(str(err)) from None
    kept = indices_within_budget(prompt_ids, budget)
    if len(kept) < len(prompt_ids):
        logger.warning("%s: dropped %d of %d prompts longer than %d tokens (max_model_len - max_new_tokens)",
                       benchmark.name, len(prompt_ids) - len(kept), len(prompt_ids), budget)
    if not kept:
        return [], []
    settings = SamplingSettings.from_config(context.generation, n=n, seed=seed)
    kept_ids = [prompt_ids[index] for index in kept]
    responses = context.generation_backend.generate(kept_ids, settings)
    kind = "correction" if benchmark.kind == "correction" else "base"
    batch = responses_to_batch(kept_ids, responses, item_indices=kept, sample_kind=kind, tokenizer=context.tokenizer)
    scores = context.scorer.score([benchmark.items[i] for i in batch["item_index"]], batch["response_text"])
    outcomes = []
    for rows in batch.group_indices().values():  # group g = kept prompt g, its n samples
        rewards = [scores.rewards[row] for row in rows]
        outcomes.append({
            "responses": [batch["response_text"][row] for row in rows],
            "scores": {"rewards": rewards, "reasons": [scores.reasons[row] for row in rows],
                       "correct": num_correct(rewards),
                       "truncated": sum(batch["finish_reason"][row] == "length" for row in rows)},
        })
    return kept, outcomes


def benchmark_record(
    benchmark: Benchmark, problems: list[dict[str, Any]], *, dropped: int, n: int, k_list: Sequence[int]
) -> dict[str, Any]:
    """Every number of one benchmark, with the per-problem rewards they come from."""
    rewards = [problem["rewards"] for problem in problems]
    reasons = Counter(reason for problem in problems for reason in problem["reasons"])
    record: dict[str, Any] = {
        "kind": benchmark.kind,
        "families": sorted({item.family for item in benchmark.items}),
        "source": benchmark.source,
        "problems_evaluated": len(problems),
        "rows_skipped": dict(benchmark.skipped),
        "prompts_dropped_too_long": dropped,
        "reasons": dict(sorted(reasons.items())),
        "truncated_samples": sum(problem["truncated"] for problem in problems),
    }
    if benchmark.kind == "correction":
        correct = [problem["solution_correct"] for problem in problems]
        record["given_solutions"] = {
            "correct": sum(correct), "flawed": len(correct) - sum(correct),
            "judged_by_label": sum(problem["solution_judged_by"] == "label" for problem in problems),
            "judged_by_verifier": sum(problem["solution_judged_by"] == "verifier" for problem in problems),
        }
        record["metrics"] = summarize_correction(rewards, correct, n=n, k_list=k_list)
    else:
        record["metrics"] = summarize(rewards, n=n, k_list=k_list)
    record["problems"] = problems
    return record


def benchmark_seed(seed: int, name: str, stream: int) -> int:
    """A sampling seed per (run seed, benchmark, stream): adding or removing a benchmark leaves the samples of
    the others unchanged."""
    return (seed * 1_000_003 + zlib.crc32(name.encode()) * 7 + stream) % (2**31)
