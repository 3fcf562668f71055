"""The replication's task: procedural multi-step sums of single digits, answered step by step.

    What is 3 + 5 + 2 + 7?  ->  3 + 5 = 8. 8 + 2 = 10. 10 + 7 = 17. \\boxed{17}

Why our own generator rather than a reasoning-gym one: a 2-core CPU budget needs a task a tiny model can learn in
seconds yet still gets wrong often (every step is a lookup the model may miss, and errors compound with the number
of terms), whose difficulty is set by the number of terms and the digits, and whose answers the math verifier
scores on its fast path (plain integers inside \\boxed{}). The "hard" variant uses only large digits.

Flawed solutions (for the warm start's correction examples) get one arithmetic slip at a random step, carried
through the following steps, as a model's own mistake would be.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SumProblem:
    id: str
    terms: tuple[int, ...]

    @property
    def question(self) -> str:
        return "What is " + " + ".join(str(t) for t in self.terms) + "?"

    @property
    def answer(self) -> int:
        return sum(self.terms)


@dataclass(frozen=True)
class TaskSpec:
    """Which problems a split holds: `min_terms`..`max_terms` digits in `min_digit`..`max_digit`."""

    min_terms: int
    max_terms: int
    min_digit: int
    max_digit: int


TRAIN_SPEC = TaskSpec(min_terms=2, max_terms=4, min_digit=1, max_digit=9)
# Harder: the longest training length with large digits only, so every step is one of the rarer large sums.
# (More terms than in training was tried first: the warm-started model stops after three steps on every 5-term
# problem, pass@32 = 0, which measures nothing.)
HARD_SPEC = TaskSpec(min_terms=4, max_terms=4, min_digit=6, max_digit=9)


def generate_problems(spec: TaskSpec, *, count: int, seed: int, prefix: str,
                      exclude: frozenset[tuple[int, ...]] = frozenset()) -> list[SumProblem]:
    """`count` distinct problems (no term tuple twice, none from `exclude`), reproducible from `seed`."""
    rng = random.Random(seed)
    seen: set[tuple[int, ...]] = set(exclude)
    problems: list[SumProblem] = []
    while len(problems) < count:
        size = rng.randint(spec.min_terms, spec.max_terms)
        terms = tuple(rng.randint(spec.min_digit, spec.max_digit) for _ in range(size))
        if terms in seen:
            continue
        seen.add(terms)
        problems.append(SumProblem(id=f"{prefix}:{len(problems)}", terms=terms))
    return problems


def solution(terms: tuple[int, ...], *, slip_at: int | None = None, slip: int = 0) -> str:
    """The step-by-step solution; with `slip_at`, the partial sum of that step is off by `slip` from then on."""
    lines, total = [], terms[0]
    for step, term in enumerate(terms[1:]):
        result = total + term + (slip if step == slip_at else 0)
        lines.append(f"{total} + {term} = {result}.")
        total = result
    return " ".join(lines) + f" \\boxed{{{total}}}"


def flawed_solution(terms: tuple[int, ...], rng: random.Random) -> str:
    """A solution with one slip of +-1..3 at a random step (so its final answer is wrong)."""
    slip = rng.choice([-3, -2, -1, 1, 2, 3])
    return solution(terms, slip_at=rng.randrange(len(terms) - 1), slip=slip)


def write_jsonl(problems: list[SumProblem], path: Path) -> Path:
    """The training-data file format (data.train.kind=file): prompt, answer, id."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = ({"id": p.id, "prompt": p.question, "answer": str(p.answer)} for p in problems)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
