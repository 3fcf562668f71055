"""The shared starting point of both arms: a tiny Llama, a BPE trained on the task text, a short supervised warm start.

The warm start teaches the answer format on training problems and, on a quarter of its examples, the correction
format (the trainer's own correction prompt around a right or a slipped solution -> the right solution). The
paper starts from an instruct model that can already follow "review this attempt" prompts; a tiny model that has
never seen one would answer them with noise, its correction stream would have no reward signal, and the
comparison would only measure the base stream twice. The correction examples are the same for both arms.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from cipo_nemo.config import MasterConfig
from cipo_nemo.data.correction_prompts import render_correction_prompt
from cipo_nemo.data.prompts import render_prompt
from cipo_nemo.data.sources import TaskItem
from cipo_nemo.models.tiny import build_tiny_model_dir, build_tiny_tokenizer, warm_start_tiny_model

from benchmarks.studies.replication.task import SumProblem, flawed_solution, solution

CORRECTION_SHARE = 0.25  # share of warm-start examples in the correction format


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    num_layers: int
    intermediate_size: int
    vocab_size: int


@dataclass(frozen=True)
class WarmStartPlan:
    shape: ModelShape
    steps: int
    batch_size: int
    lr: float


def task_item(problem: SumProblem) -> TaskItem:
    """The TaskItem a data file row of `problem` loads as (see task.write_jsonl)."""
    return TaskItem(id=problem.id, family="math", prompt=problem.question, messages=None, answer=str(problem.answer),
                    origin=problem.id, metadata={})


def sft_examples(problems: list[SumProblem], cfg: MasterConfig, tokenizer, *, seed: int) -> list[tuple[str, str]]:
    """(rendered prompt, response) pairs: answers to problems and, for some, corrections of an attempt."""
    rng = random.Random(seed)
    pairs = []
    for problem in problems:
        item = task_item(problem)
        target = solution(problem.terms)
        if rng.random() < CORRECTION_SHARE:
            attempt = target if rng.random() < 0.5 else flawed_solution(problem.terms, rng)
            pairs.append((render_correction_prompt(item, attempt, tokenizer=tokenizer, data=cfg.data,
                                                   correction=cfg.cipo), target))
        else:
            pairs.append((render_prompt(item, tokenizer=tokenizer, instructions=cfg.data.instructions,
                                        system_prompt=cfg.data.system_prompt), target))
    return pairs


def build_warm_start(model_dir: Path, problems: list[SumProblem], cfg: MasterConfig, plan: WarmStartPlan, *,
                     seed: int) -> Path:
    """Tokenizer, random model and warm start in `model_dir` (an HF directory both arms start from)."""
    # The chat template is fixed text, so a bootstrap tokenizer renders the same strings the real one will;
    # the real BPE is then trained on exactly those strings.
    bootstrap = build_tiny_tokenizer()
    corpus_pairs = sft_examples(problems, cfg, bootstrap, seed=seed)
    tokenizer = build_tiny_tokenizer([p + r for p, r in corpus_pairs], vocab_size=plan.shape.vocab_size)
    shape = plan.shape
    build_tiny_model_dir(model_dir, tokenizer=tokenizer, hidden_size=shape.hidden_size, num_layers=shape.num_layers,
                         intermediate_size=shape.intermediate_size, tie_word_embeddings=True, seed=seed)
    pairs = sft_examples(problems, cfg, tokenizer, seed=seed)
    # Two stages, the second at a third of the learning rate: a constant rate leaves the tiny model noisy at the
    # end (pass@1 jumps by several points between neighbouring steps), so the shared start would be a lottery.
    first = plan.steps * 2 // 3
    warm_start_tiny_model(model_dir, pairs, steps=first, batch_size=plan.batch_size, lr=plan.lr, seed=seed)
    return warm_start_tiny_model(model_dir, pairs, steps=plan.steps - first, batch_size=plan.batch_size,
                                 lr=plan.lr / 3, seed=seed + 1)
