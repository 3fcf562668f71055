"""Throughput of the math verifier: plain per-call math-verify loop vs. MathVerifierPool.

Builds the same seeded mix of (response, gold) pairs every run (about 60% plain numeric answers, the rest LaTeX
fractions, expressions that need sympy, and responses without a final answer), then measures

  (a) plain: ``verify(parse("$gold$"), parse(response))`` per pair, timeouts disabled, one process;
  (b) batch: ``MathVerifierPool(num_workers=W).score(responses, golds)`` (pool start-up reported separately, since
      a trainer keeps one pool alive across steps);

and prints verifications/second for each, the ratio batch/plain, and how often the two verdicts agree.

Disagreements are expected only where the two extract different answers: (a) lets math-verify pick any number
or expression in the whole response, while (b) requires a marked final answer (boxed, ``####``, "the answer is")
and reports ``no_answer`` otherwise, e.g. for a truncated response that happens to mention the gold number.

Usage: python benchmarks/speed/verifier_throughput.py [--pairs 2000] [--workers 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from math_verify import parse, verify  # noqa: E402

from cipo_nemo.environments.math import reason_counts  # noqa: E402
from cipo_nemo.environments.math_pool import MathVerifierPool  # noqa: E402

Pair = tuple[str, str]  # (response, gold)

_FILLER = [
    "Let me work through this step by step.",
    "First, {a} + {b} = {s}.",
    "Multiplying, {a} \\times {b} = {p}.",
    "We subtract to get {d}.",
    "Checking the units, everything is consistent.",
    "So the remaining quantity is {b}.",
]


def _reasoning(rng: random.Random) -> str:
    """A few sentences of chain of thought with incidental numbers, like a real rollout."""
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    values = {"a": a, "b": b, "s": a + b, "p": a * b, "d": abs(a - b)}
    return " ".join(rng.choice(_FILLER).format(**values) for _ in range(rng.randint(2, 6)))


def _other_int(rng: random.Random, value: int) -> int:
    return value + rng.choice([-3, -2, -1, 1, 2, 10])


def _integer_boxed(rng: random.Random, correct: bool) -> Pair:
    gold = rng.randint(0, 5000)
    answer = gold if correct else _other_int(rng, gold)
    return f"{_reasoning(rng)} The total is $\\boxed{{{answer}}}$.", str(gold)


def _decimal_boxed(rng: random.Random, correct: bool) -> Pair:
    gold = rng.randint(1, 9999) / 100
    answer = f"{gold:.2f}" if correct else f"{gold + rng.choice([-0.5, 0.25, 1.0]):.2f}"
    return f"{_reasoning(rng)} Therefore the price is \\boxed{{{answer}}}.", f"{gold:g}"


def _gsm8k(rng: random.Random, correct: bool) -> Pair:
    gold = rng.randint(1000, 99999)
    answer = gold if correct else _other_int(rng, gold)
    return f"{_reasoning(rng)}\n#### {answer:,}", str(gold)


def _answer_is(rng: random.Random, correct: bool) -> Pair:
    gold = rng.randint(-50, 500)
    answer = gold if correct else _other_int(rng, gold)
    return f"{_reasoning(rng)} The answer is {answer}.", str(gold)


def _latex_fraction(rng: random.Random, correct: bool) -> Pair:
    numerator, denominator = rng.randint(1, 9), rng.randint(10, 19)
    scale = rng.choice([1, 2, 3])  # unreduced forms such as 6/22 need sympy, not string equality
    answer_numerator = numerator if correct else numerator + 1
    command = rng.choice(["\\frac", "\\dfrac"])
    boxed = f"\\boxed{{{command}{{{answer_numerator * scale}}}{{{denominator * scale}}}}}"
    return f"{_reasoning(rng)} Hence $p = {boxed}$.", f"\\frac{{{numerator}}}{{{denominator}}}"


def _sympy_expression(rng: random.Random, correct: bool) -> Pair:
    a = rng.randint(1, 9)
    kind = rng.choice(["square", "sqrt", "product"])
    if kind == "square":
        gold, answer = f"(x+{a})^2", f"x^2+{2 * a}x+{a * a + (0 if correct else 1)}"
    elif kind == "sqrt":
        gold, answer = f"{a}\\sqrt{{2}}", f"\\sqrt{{{2 * a * a + (0 if correct else 1)}}}"
    else:
        gold, answer = f"(x-{a})(x+{a})", f"x^2-{a * a + (0 if correct else 1)}"
    return f"{_reasoning(rng)} Simplifying, we obtain $\\boxed{{{answer}}}$.", gold


def _no_answer(rng: random.Random, correct: bool) -> Pair:
    gold = rng.randint(2, 99)
    # Truncated mid-thought; half of them mention the gold number in passing.
    mention = f" so far we have {gold} items, but" if correct else ""
    return f"{_reasoning(rng)}{mention} wait, let me recheck the second step", str(gold)


# (generator, weight): about 60% plain-numeric answers, as in GSM8K/MATH-style RL data.
_MIX: list[tuple[Callable[[random.Random, bool], Pair], float]] = [
    (_integer_boxed, 0.30),
    (_decimal_boxed, 0.08),
    (_gsm8k, 0.12),
    (_answer_is, 0.10),
    (_latex_fraction, 0.15),
    (_sympy_expression, 0.15),
    (_no_answer, 0.10),
]


def build_pairs(count: int, seed: int = 0) -> list[Pair]:
    """``count`` (response, gold) pairs, identical for the same (count, seed); ~70% of answers are correct."""
    rng = random.Random(seed)
    generators = [generator for generator, _ in _MIX]
    weights = [weight for _, weight in _MIX]
    return [rng.choices(generators, weights)[0](rng, rng.random() < 0.7) for _ in range(count)]


def run_plain(pairs: list[Pair]) -> list[bool]:
    """One math-verify call per pair on the raw response. The gold is wrapped in ``$...$`` as the pool does:
    unwrapped, math-verify reads a bare LaTeX gold such as ``3\\sqrt{2}`` as just ``3``."""
    return [
        bool(
            verify(
                parse(f"${gold}$", parsing_timeout=None),
                parse(response, parsing_timeout=None),
                timeout_seconds=None,
            )
        )
        for response, gold in pairs
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=5.0)
    args = parser.parse_args()

    pairs = build_pairs(args.pairs, args.seed)
    responses = [response for response, _ in pairs]
    golds = [gold for _, gold in pairs]

    started = time.perf_counter()
    plain_correct = run_plain(pairs)
    plain_s = time.perf_counter() - started

    started = time.perf_counter()
    with MathVerifierPool(num_workers=args.workers, timeout_s=args.timeout_s) as pool:
        pool.wait_until_ready()
        startup_s = time.perf_counter() - started
        started = time.perf_counter()
        verdicts = pool.score(responses, golds)
        batch_s = time.perf_counter() - started
        shipped = pool.math_verify_calls

    plain_rate, batch_rate = len(pairs) / plain_s, len(pairs) / batch_s
    print(f"pairs: {len(pairs)} (seed {args.seed}), workers: {args.workers}")
    print(f"(a) plain math-verify loop : {plain_s:7.2f} s  {plain_rate:8.1f} verifications/s")
    print(
        f"(b) MathVerifierPool        : {batch_s:7.2f} s  {batch_rate:8.1f} verifications/s"
        f"  (+{startup_s:.2f} s pool start-up, {shipped} pairs sent to math-verify)"
    )
    print(f"speed-up batch/plain       : {batch_rate / plain_rate:.1f}x")
    print(f"batch reasons              : {reason_counts(verdicts)}")

    disagreements = [
        (pair, plain, verdict)
        for pair, plain, verdict in zip(pairs, plain_correct, verdicts)
        if plain != (verdict.reason == "correct")
    ]
    agreement = 1 - len(disagreements) / len(pairs)
    print(f"agreement                  : {agreement:.4f} ({len(disagreements)} disagreements)")
    kinds = Counter(
        f"plain={'correct' if plain else 'wrong'}/batch={verdict.reason}" for _, plain, verdict in disagreements
    )
    print(f"disagreement kinds         : {dict(kinds)}")
    for (response, gold), plain, verdict in disagreements[:5]:
        print(f"  gold={gold!r} plain={'correct' if plain else 'wrong'} batch={verdict.reason}")
        print(f"    response tail: {response[-90:]!r}")


if __name__ == "__main__":
    main()
