"""The corrections study's registered analysis: measures, comparisons, intervals, sign tests, verdicts, power.

This module is the analysis the registration names (its git blob hash is in registration.json); the report
(report.py) only renders what it returns. Changing it after the registration is a deviation the report states.

Measures, per seed and model, per problem (avg@n: the share of a problem's n samples that are right):
- heldout:   plain prompts, every problem of the seed's held-out pool;
- plain:     plain prompts, the seed's correction problems only (the same numbers, restricted);
- fix_T / keep_T: correction prompts on the template the CIPO arms trained on, quoting the start model's wrong /
  right attempt at the problem (wrong->right, right->right); fix_N / keep_N: the same on the reworded template no
  arm trained on;
- bal_T / bal_N: (fix + keep) / 2 of the same problem (each correction problem is quoted once in each role);
- anchor_fix_T / anchor_keep_T: fix_T - plain and keep_T - plain (what the quoted attempt does to the answer).

A comparison "B vs A" of a measure: per seed s, d_p = B_p - A_p over the problems both have and D_s = mean_p d_p;
pooled D = mean_s D_s (seeds weigh equally). Its 95% interval is a two-level percentile bootstrap (resample the
seeds, then the problems within each drawn seed), per seed a one-level bootstrap over its problems. The sign test
counts the seeds whose D_s lies on the claim's side of its threshold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from cipo_nemo.eval.report import num_correct

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 20_261_208  # fixed: a re-rendered report shows the same intervals
CONFIDENCE = 0.95
MIN_SEEDS = 3  # pooled verdicts need at least this many seeds with every unit of both arms
NON_INFERIORITY_MARGIN = -0.05
TEMPLATES = ("T", "N")  # T: the trained correction template; N: the reworded one no arm trained on
TEMPLATE_NAMES = {"T": "trained template", "N": "reworded template"}

# Which evaluation part and benchmark hold each raw measure (benchmarks/studies/study_corrections.py writes them).
RAW_MEASURES = {
    "heldout": ("answers", "heldout"),
    "fix_T": ("trained", "fix_trained"), "keep_T": ("trained", "keep_trained"),
    "fix_N": ("reworded", "fix_reworded"), "keep_N": ("reworded", "keep_reworded"),
}
MEASURE_LABELS = {
    "heldout": "held-out avg@n", "plain": "plain accuracy on the correction problems",
    "fix_T": "wrong->right, trained template", "keep_T": "right->right, trained template",
    "bal_T": "balanced correction, trained template", "fix_N": "wrong->right, reworded template",
    "keep_N": "right->right, reworded template", "bal_N": "balanced correction, reworded template",
    "anchor_fix_T": "wrong->right minus plain, trained template",
    "anchor_keep_T": "right->right minus plain, trained template",
}


@dataclass(frozen=True)
class Claim:
    """One registered claim: B - A on `measures` (one per template), each judged by `threshold`.

    kind "superiority": held when every interval's lower bound exceeds `threshold` (0), not held when some
    interval's upper bound lies below it. kind "non-inferiority": the same rule with the margin as threshold
    (held: every lower bound above -0.05; not held: some upper bound below -0.05)."""

    key: str
    statement: str
    a: str
    b: str
    measures: tuple[str, ...]
    kind: str
    threshold: float

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "statement": self.statement, "comparison": f"{self.b} - {self.a}",
                "measures": list(self.measures), "kind": self.kind, "threshold": self.threshold}


CLAIMS = (
    Claim("C1", "CIPO corrects wrong attempts more often than GRPO, on the trained and on the reworded template",
          "grpo", "cipo", ("fix_T", "fix_N"), "superiority", 0.0),
    Claim("C2", "CIPO keeps right attempts no less than GRPO, within a margin of 0.05, on both templates",
          "grpo", "cipo", ("keep_T", "keep_N"), "non-inferiority", NON_INFERIORITY_MARGIN),
    Claim("C3", "CIPO's balanced correction ((wrong->right + right->right) / 2) exceeds GRPO's, on both templates",
          "grpo", "cipo", ("bal_T", "bal_N"), "superiority", 0.0),
    Claim("C4", "CIPO trained on its own attempts corrects wrong attempts more often than CIPO trained on frozen "
          "start-model attempts, on both templates", "frozen", "cipo", ("fix_T", "fix_N"), "superiority", 0.0),
)
# Secondary comparisons: an interval and a direction each, never a claim.
SECONDARY = (
    ("grpo", "cipo", "heldout"), ("frozen", "cipo", "heldout"), ("grpo", "frozen", "heldout"),
    ("grpo", "frozen", "fix_T"), ("grpo", "frozen", "fix_N"), ("grpo", "frozen", "keep_T"),
    ("grpo", "frozen", "keep_N"), ("frozen", "cipo", "keep_T"), ("frozen", "cipo", "keep_N"),
    ("frozen", "cipo", "bal_T"), ("frozen", "cipo", "bal_N"), ("grpo", "cipo", "plain"),
    ("grpo", "cipo", "anchor_fix_T"), ("grpo", "cipo", "anchor_keep_T"),
)

VERDICT_RULES = (
    "Each claim's measures are compared as B - A per problem; the pooled difference (mean over seeds of each seed's "
    "mean over problems) gets a 95% two-level percentile bootstrap interval (10,000 resamples: seeds with "
    "replacement, then problems with replacement within each drawn seed; fixed generator seed). A superiority claim "
    "is HELD when the lower bound is above 0 on every measure it names (both templates), NOT HELD when the upper "
    "bound is below 0 on any of them, and NOT SHOWN otherwise. The non-inferiority claim uses -0.05 in place of 0. "
    "Pooled verdicts are given only when at least 3 seeds have every unit both arms need; until then the claim is "
    "'waiting'. Per-seed verdicts (one-level bootstrap over that seed's problems) are reported beside the pooled "
    "ones and do not replace them. The sign test (the number of seeds whose difference lies beyond the threshold, "
    "exact binomial, one-sided) is reported beside every verdict and never changes it; with 3 seeds its smallest "
    "one-sided p is 0.125. The four claims are read as four separate tests (no correction across them). No verdict "
    "is drawn from a point estimate."
)


# ---------------------------------------------------------------------------------------------- measures


def problem_rates(results: Mapping[str, Any], benchmark: str) -> dict[str, float]:
    """Problem id -> avg@n (share of right samples) from a harness results.json."""
    return {problem["id"]: num_correct(problem["rewards"]) / len(problem["rewards"])
            for problem in results["benchmarks"][benchmark]["problems"]}


def model_measures(parts: Mapping[str, Mapping[str, Any]],
                   correction_ids: Sequence[str]) -> dict[str, dict[str, float]]:
    """Every per-problem measure of one model from its evaluation parts (part name -> results.json); a measure whose
    part is missing is absent."""
    out: dict[str, dict[str, float]] = {}
    for measure, (part, benchmark) in RAW_MEASURES.items():
        if part in parts and benchmark in parts[part]["benchmarks"]:
            out[measure] = problem_rates(parts[part], benchmark)
    if "heldout" in out:
        out["plain"] = {key: out["heldout"][key] for key in correction_ids if key in out["heldout"]}
    for template in TEMPLATES:
        fix, keep = out.get(f"fix_{template}"), out.get(f"keep_{template}")
        if fix is not None and keep is not None:
            out[f"bal_{template}"] = {key: (fix[key] + keep[key]) / 2 for key in sorted(set(fix) & set(keep))}
    if "plain" in out:
        for role in ("fix", "keep"):
            if f"{role}_T" in out:
                rates = out[f"{role}_T"]
                out[f"anchor_{role}_T"] = {key: rates[key] - out["plain"][key]
                                           for key in sorted(set(rates) & set(out["plain"]))}
    return out


def differences(a: Mapping[str, float], b: Mapping[str, float]) -> np.ndarray:
    """b - a per problem over the problems both have, in a fixed (sorted id) order."""
    shared = sorted(set(a) & set(b))
    return np.array([b[key] - a[key] for key in shared], dtype=float)


# ---------------------------------------------------------------------------------------------- intervals


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    seeds: int
    problems: int  # over all seeds

    def text(self) -> str:
        return f"{self.estimate:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def two_level_bootstrap(per_seed: Sequence[np.ndarray], *, resamples: int = BOOTSTRAP_RESAMPLES,
                        seed: int = BOOTSTRAP_SEED) -> Interval:
    """The pooled mean difference (mean over seeds of each seed's mean) and its percentile interval from resampling
    seeds with replacement, then problems with replacement within each drawn seed. One seed: a plain bootstrap over
    its problems."""
    arrays = [np.asarray(values, dtype=float) for values in per_seed]
    if not arrays or any(len(values) == 0 for values in arrays):
        raise ValueError("every seed needs at least one problem")
    rng = np.random.default_rng(seed)
    count = len(arrays)
    drawn_seeds = rng.integers(0, count, size=(resamples, count)) if count > 1 else np.zeros((resamples, 1), int)
    # resampled[s][:, j]: seed s's problem-bootstrap mean for position j of every resample (used where s was drawn)
    resampled = [np.stack([values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
                           for _ in range(count)], axis=1) for values in arrays]
    stacked = np.stack(resampled)  # (seeds, resamples, positions)
    means = stacked[drawn_seeds, np.arange(resamples)[:, None], np.arange(count)[None, :]].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    estimate = float(np.mean([values.mean() for values in arrays]))
    return Interval(estimate=estimate, low=float(low), high=float(high), seeds=count,
                    problems=sum(len(values) for values in arrays))


@dataclass(frozen=True)
class SignTest:
    beyond: int  # seeds whose difference lies beyond the threshold on the claim's side
    seeds: int
    p_one_sided: float

    def text(self) -> str:
        return f"{self.beyond} of {self.seeds} seeds, one-sided p = {self.p_one_sided:.3f}"


def sign_test(seed_differences: Sequence[float], *, threshold: float = 0.0) -> SignTest:
    """Exact binomial sign test of 'the seeds' differences lie above `threshold`': P(X >= k), X ~ Bin(n, 1/2), over
    the seeds not exactly at the threshold."""
    informative = [value for value in seed_differences if value != threshold]
    beyond = sum(value > threshold for value in informative)
    n = len(informative)
    p = sum(math.comb(n, k) for k in range(beyond, n + 1)) / 2**n if n else 1.0
    return SignTest(beyond=beyond, seeds=len(seed_differences), p_one_sided=p)


# ---------------------------------------------------------------------------------------------- verdicts


def judge(claim: Claim, intervals: Sequence[Interval]) -> str:
    """held / not held / not shown by the registered rule (see Claim)."""
    if all(interval.low > claim.threshold for interval in intervals):
        return "held"
    if any(interval.high < claim.threshold for interval in intervals):
        return "not held"
    return "not shown"


def direction(interval: Interval) -> str:
    """A secondary comparison's reading: which model is higher, where the interval excludes 0."""
    if interval.low > 0:
        return "B higher"
    if interval.high < 0:
        return "A higher"
    return "no difference shown"


@dataclass
class Comparison:
    a: str
    b: str
    measure: str
    per_seed: dict[str, Interval] = field(default_factory=dict)  # seed name -> one-level interval
    pooled: Interval | None = None
    signs: SignTest | None = None


def compare(measures: Mapping[str, Mapping[str, Mapping[str, dict[str, float]]]], a: str, b: str, measure: str, *,
            threshold: float = 0.0) -> Comparison:
    """B - A on `measure` for every seed that has it for both models (measures: seed -> model -> measure ->
    problem -> value); pooled over them when there are at least MIN_SEEDS."""
    result = Comparison(a=a, b=b, measure=measure)
    arrays = {}
    for seed_name, models in measures.items():
        if measure in models.get(a, {}) and measure in models.get(b, {}):
            values = differences(models[a][measure], models[b][measure])
            if len(values):
                arrays[seed_name] = values
                result.per_seed[seed_name] = two_level_bootstrap([values])
    if len(arrays) >= MIN_SEEDS:
        result.pooled = two_level_bootstrap(list(arrays.values()))
        result.signs = sign_test([values.mean() for values in arrays.values()], threshold=threshold)
    return result


@dataclass
class ClaimResult:
    claim: Claim
    comparisons: list[Comparison]
    verdict: str  # held / not held / not shown / waiting
    per_seed: dict[str, str]  # seed name -> verdict on that seed alone


def evaluate_claims(measures: Mapping[str, Mapping[str, Mapping[str, dict[str, float]]]]) -> list[ClaimResult]:
    """Every registered claim on the measures of the finished units."""
    results = []
    for claim in CLAIMS:
        comparisons = [compare(measures, claim.a, claim.b, measure, threshold=claim.threshold)
                       for measure in claim.measures]
        pooled = [c.pooled for c in comparisons]
        verdict = "waiting" if any(p is None for p in pooled) else judge(claim, pooled)  # type: ignore[arg-type]
        seeds = sorted(set.intersection(*(set(c.per_seed) for c in comparisons)))
        per_seed = {s: judge(claim, [c.per_seed[s] for c in comparisons]) for s in seeds}
        results.append(ClaimResult(claim=claim, comparisons=comparisons, verdict=verdict, per_seed=per_seed))
    return results


def evaluate_secondary(measures: Mapping[str, Mapping[str, Mapping[str, dict[str, float]]]]) -> list[Comparison]:
    return [compare(measures, a, b, measure) for a, b, measure in SECONDARY]


# ---------------------------------------------------------------------------------------------- power


@dataclass(frozen=True)
class Spread:
    """What a power calculation needs of one measure: the per-problem SD of the difference at `samples` samples
    per problem, the part of its variance that is sampling noise, and an effect to plan for."""

    measure: str
    sd: float
    noise_variance: float
    samples: int
    problems: int
    observed: float

    def sd_at(self, samples: int) -> float:
        """The per-problem SD at another number of samples: the noise part scales with 1 / samples."""
        variance = self.sd**2 + self.noise_variance * (self.samples / samples - 1)
        return math.sqrt(max(variance, 0.0))


def spread_from(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]], measure: str) -> Spread:
    """The spread of B - A per problem from two evaluations' rewards (problem id -> the n rewards)."""
    shared = sorted(set(a) & set(b))
    rates_a = np.array([num_correct(a[key]) / len(a[key]) for key in shared])
    rates_b = np.array([num_correct(b[key]) / len(b[key]) for key in shared])
    n = len(a[shared[0]])
    # unbiased per-problem binomial variance of a rate: p(1 - p) / (n - 1), for each model
    noise = float(np.mean((rates_a * (1 - rates_a) + rates_b * (1 - rates_b)) / (n - 1)))
    diff = rates_b - rates_a
    return Spread(measure=measure, sd=float(diff.std(ddof=1)), noise_variance=noise, samples=n, problems=len(shared),
                  observed=float(diff.mean()))


def standard_error(sd: float, *, problems: int, seeds: int, seed_sd: float) -> float:
    """SE of the pooled difference: sqrt(tau^2 / S + sigma^2 / (S N))."""
    return math.sqrt(seed_sd**2 / seeds + sd**2 / (seeds * problems))


def bootstrap_standard_error(sd: float, *, problems: int, seeds: int, seed_sd: float) -> float:
    """The spread the two-level bootstrap gives the pooled difference, in expectation: resampling S seeds sees
    their means' variance (tau^2 + sigma^2 / N) shrunk by (S-1)/S, and the problem level adds sigma^2 / N again:
    sqrt((S-1)/S^2 (tau^2 + sigma^2/N) + sigma^2/(S N)). Wider than the true SE when seeds agree (problem noise
    counted twice), narrower when they disagree much (few seeds under-state their spread)."""
    return math.sqrt((seeds - 1) / seeds**2 * (seed_sd**2 + sd**2 / problems) + sd**2 / (seeds * problems))


def _z(probability: float) -> float:
    return NormalDist().inv_cdf(probability)


def power(effect: float, se: float, *, threshold: float = 0.0, interval_se: float | None = None) -> float:
    """P(lower bound of the 95% interval > threshold) for a true difference `effect` whose estimate has SE `se`,
    when the interval's half-width is z_0.975 * interval_se (the bootstrap's, by default the true SE), normal
    approximation: Phi((effect - threshold - z_0.975 * interval_se) / se)."""
    half_width = _z(1 - (1 - CONFIDENCE) / 2) * (se if interval_se is None else interval_se)
    return NormalDist().cdf((effect - threshold - half_width) / se)


def detectable_effect(se: float, *, interval_se: float | None = None, target: float = 0.8) -> float:
    """The smallest true difference shown with probability `target`: z_0.975 * interval_se + z_target * se."""
    return _z(1 - (1 - CONFIDENCE) / 2) * (se if interval_se is None else interval_se) + _z(target) * se


def simulated_power(effect: float, sd: float, *, problems: int, seeds: int, seed_sd: float, threshold: float = 0.0,
                    replicates: int = 200, resamples: int = 1000, seed: int = 0) -> float:
    """The share of simulated studies whose two-level bootstrap lower bound exceeds `threshold`: normal per-problem
    differences (sd) around per-seed means drawn around `effect` (seed_sd). With few seeds the bootstrap's seed
    level is narrower than the normal approximation assumes; this measures the registered procedure itself."""
    rng = np.random.default_rng(seed)
    shown = 0
    for replicate in range(replicates):
        centres = effect + seed_sd * rng.standard_normal(seeds)
        data = [centre + sd * rng.standard_normal(problems) for centre in centres]
        interval = two_level_bootstrap(data, resamples=resamples, seed=seed + replicate)
        shown += interval.low > threshold
    return shown / replicates


POWER_SEEDS = (3, 5)
POWER_SEED_SDS = (0.0, 0.02, 0.04)  # between-seed SD of a difference: one seed cannot measure it, so a range
SIMULATED = ((3, 0.0), (3, 0.02))  # (seeds, seed SD): the planned study, simulated with the registered bootstrap


def seed0_spreads(grpo: Mapping[str, Any], cipo: Mapping[str, Any]) -> dict[str, Spread]:
    """The per-problem spreads of CIPO - GRPO in the seed-0 study (docs/results/study_instruct/seed0): held-out,
    wrong->right and right->right. Seed 0 quoted each problem in one role only, so the balanced measure's spread is
    built from the other two as if they were independent: sd = sqrt(sd_fix^2 + sd_keep^2) / 2."""
    def rewards(results: Mapping[str, Any], benchmark: str, role: bool | None) -> dict[str, list[float]]:
        return {p["id"]: p["rewards"] for p in results["benchmarks"][benchmark]["problems"]
                if role is None or p["solution_correct"] == role}

    spreads = {"heldout": spread_from(rewards(grpo, "heldout", None), rewards(cipo, "heldout", None), "heldout"),
               "fix": spread_from(rewards(grpo, "correction", False), rewards(cipo, "correction", False), "fix"),
               "keep": spread_from(rewards(grpo, "correction", True), rewards(cipo, "correction", True), "keep")}
    fix, keep = spreads["fix"], spreads["keep"]
    spreads["bal"] = Spread(measure="bal", sd=math.hypot(fix.sd, keep.sd) / 2,
                            noise_variance=(fix.noise_variance + keep.noise_variance) / 4, samples=fix.samples,
                            problems=min(fix.problems, keep.problems), observed=(fix.observed + keep.observed) / 2)
    return spreads


def power_table(spreads: Mapping[str, Spread], *, problems: Mapping[str, int], samples: int,
                replicates: int = 200, resamples: int = 500) -> dict[str, Any]:
    """Per claim measure, seeds (3, 5) and between-seed SD: the SE of the pooled difference and of the registered
    bootstrap's interval, the difference the registered test shows with 80% power, its power for a planned effect
    and its size (how often it says 'held' when the true difference sits exactly at the threshold; nominally
    2.5%), by the normal approximation and, where simulated (SIMULATED; `replicates` 0: nowhere), by running the
    bootstrap on simulated studies. Planned effects: seed 0's point estimate for the superiority measures (an
    exploratory number, the best guess there is), 0 for non-inferiority (power to show the lower bound above -0.05
    when the arms are equal)."""
    plans = {"heldout": ("held-out avg@n (secondary)", 0.0, None), "fix": ("wrong->right (C1, C4)", 0.0, None),
             "keep": ("right->right (C2, non-inferiority)", NON_INFERIORITY_MARGIN, 0.0),
             "bal": ("balanced correction (C3)", 0.0, None)}
    rows = []
    for key, (label, threshold, planned) in plans.items():
        spread = spreads[key]
        sd = spread.sd_at(samples)
        effect = spread.observed if planned is None else planned
        source = "seed 0" if planned is None else "equal arms"
        for seeds in POWER_SEEDS:
            for seed_sd in POWER_SEED_SDS:
                shape = {"problems": problems[key], "seeds": seeds, "seed_sd": seed_sd}
                se, interval_se = standard_error(sd, **shape), bootstrap_standard_error(sd, **shape)
                row = {"measure": label, "sd": sd, **shape, "se": se, "interval_se": interval_se,
                       "detectable": detectable_effect(se, interval_se=interval_se), "effect": effect,
                       "effect_source": source,
                       "power": power(effect, se, threshold=threshold, interval_se=interval_se),
                       "size": power(threshold, se, threshold=threshold, interval_se=interval_se),
                       "simulated_power": None, "simulated_size": None}
                if replicates and (seeds, seed_sd) in SIMULATED:
                    settings = {"problems": problems[key], "seeds": seeds, "seed_sd": seed_sd, "threshold": threshold,
                                "replicates": replicates, "resamples": resamples}
                    row["simulated_power"] = simulated_power(effect, sd, **settings)
                    row["simulated_size"] = simulated_power(threshold, sd, **settings, seed=1)  # at the threshold
                rows.append(row)
    return {
        "basis": (f"per-problem spreads of CIPO - GRPO in the seed-0 study, rescaled from its {spreads['fix'].samples} "
                  f"to {samples} samples per problem; the claims' 'detectable at 80%' is the smallest true "
                  "difference the registered test shows four times in five"),
        "seed0": {key: {"sd": s.sd, "noise_variance": s.noise_variance, "samples": s.samples, "problems": s.problems,
                        "observed": s.observed} for key, s in spreads.items()},
        "rows": rows,
        "notes": [
            "Notes: the between-seed SD cannot be measured from one seed; the rows span 0 to 0.04. The two-level "
            "bootstrap is not an exact test: in expectation its interval has the spread sqrt((S-1)/S^2 (tau^2 + "
            "sigma^2/N) + sigma^2/(S N)) (column 'interval SE') against the estimate's true sqrt(tau^2/S + "
            "sigma^2/(S N)) ('SE'). When seeds agree it counts the problem noise twice and is conservative (size "
            "below 2.5%, less power); when the between-seed SD is large against the within-seed noise (held-out "
            "avg@n, 384 problems) it is too narrow with 3 seeds and says 'held' more often than 2.5% at equal arms "
            "(the size columns). The registered rule is kept as it is; the size columns say how far to trust each "
            f"verdict. The simulated columns run the registered bootstrap ({resamples} resamples) on {replicates} "
            "simulated studies with normal per-problem differences. "
            "The wrong->right effect planned for (seed 0's +0.1) was measured on the trained template only; on the "
            "reworded template no estimate exists. C4 (CIPO vs frozen-anchor CIPO) has no prior estimate at all: its "
            "row is the wrong->right row's detectable difference.",
        ],
    }
