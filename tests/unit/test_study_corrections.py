"""The corrections study's pieces that need no model: the measures, the two-level bootstrap, the sign test, the
verdict rules, the power calculation, the registration and git's witness that it came first, the units and their
time estimates, the correction set, and the report on synthetic results."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.studies import study_corrections
from benchmarks.studies.corrections import analysis, registration, units
from benchmarks.studies.corrections.analysis import Interval
from benchmarks.studies.corrections.design import (
    Design,
    changed_keys,
    correction_benchmarks,
    registered_configs,
    registered_fingerprints,
    select_correction_set,
)
from benchmarks.studies.corrections.report import write_report
from cipo_nemo.data.sources import TaskItem

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------- statistics


def test_the_two_level_bootstrap_resamples_seeds_and_problems() -> None:
    rng = np.random.default_rng(0)
    same = [0.1 + 0.2 * rng.standard_normal(200) for _ in range(3)]
    spread = [centre + 0.2 * rng.standard_normal(200) for centre in (-0.1, 0.1, 0.3)]
    tight, wide = analysis.two_level_bootstrap(same), analysis.two_level_bootstrap(spread)
    assert tight.estimate == pytest.approx(np.mean([s.mean() for s in same]))
    assert tight.low < tight.estimate < tight.high and tight.seeds == 3 and tight.problems == 600
    # seeds that disagree widen the interval far beyond what the problems alone would give
    assert (wide.high - wide.low) > 3 * (tight.high - tight.low)
    assert analysis.two_level_bootstrap(same) == tight  # a fixed generator seed: the report is reproducible
    # constant problems within each seed: all the width comes from the seed level
    constant = analysis.two_level_bootstrap([np.full(50, v) for v in (0.0, 0.1, 0.2)])
    assert constant.low < 0.1 < constant.high and constant.low >= 0.0 and constant.high <= 0.2


def test_two_level_bootstrap_hand_computed_cases() -> None:
    # seeds weigh equally: (1 + 0) / 2, not 4 / 5 over the problems
    assert analysis.two_level_bootstrap([np.ones(4), np.zeros(1)]).estimate == pytest.approx(0.5)
    # three constant seeds (0, 0, 0.3): a resample's mean is k * 0.1 with k ~ Bin(3, 1/3): P(0) = 0.296 > 2.5%,
    # P(0.3) = 0.037 > 2.5%, so the interval is exactly [0, 0.3] around 0.1
    interval = analysis.two_level_bootstrap([np.zeros(5), np.zeros(5), np.full(5, 0.3)])
    assert (interval.estimate, interval.low, interval.high) == (pytest.approx(0.1), 0.0, pytest.approx(0.3))
    # one seed of two problems (0, 1): a resample's mean is 0, 0.5 or 1 with 1/4, 1/2, 1/4: the interval is [0, 1]
    interval = analysis.two_level_bootstrap([np.array([0.0, 1.0])])
    assert (interval.estimate, interval.low, interval.high) == (0.5, 0.0, 1.0)
    # three identical seeds of two problems (0, 1): the seed level adds nothing, the problem level gives the width:
    # the mean of 3 independent resample means, each 0 / 0.5 / 1, is 0 with probability (1/4)^3 = 1.6% < 2.5%
    interval = analysis.two_level_bootstrap([np.array([0.0, 1.0])] * 3)
    assert 0.0 < interval.low <= 1 / 6 and 5 / 6 <= interval.high < 1.0


def test_one_seed_is_a_bootstrap_over_its_problems() -> None:
    values = np.array([0.0, 0.5, 1.0, 0.25] * 20)
    interval = analysis.two_level_bootstrap([values])
    assert interval.estimate == pytest.approx(values.mean()) and interval.seeds == 1
    se = values.std(ddof=0) / np.sqrt(len(values))
    assert interval.high - interval.low == pytest.approx(2 * 1.96 * se, rel=0.1)
    with pytest.raises(ValueError, match="at least one problem"):
        analysis.two_level_bootstrap([values, np.array([])])


def test_the_sign_test_is_the_exact_binomial_tail() -> None:
    assert analysis.sign_test([0.1, 0.2, 0.3]).p_one_sided == pytest.approx(0.125)
    assert analysis.sign_test([0.1, 0.2, -0.3]).p_one_sided == pytest.approx(0.5)
    assert analysis.sign_test([0.1] * 5).p_one_sided == pytest.approx(1 / 32)
    margin = analysis.sign_test([-0.01, -0.02, -0.08], threshold=-0.05)
    assert (margin.beyond, margin.seeds, margin.p_one_sided) == (2, 3, 0.5)
    assert analysis.sign_test([0.0, 0.1], threshold=0.0).p_one_sided == pytest.approx(0.5)  # ties left out


def _interval(low: float, high: float) -> Interval:
    return Interval(estimate=(low + high) / 2, low=low, high=high, seeds=3, problems=300)


def test_the_verdict_rules_need_every_template_and_use_the_margin() -> None:
    c1, c2 = analysis.CLAIMS[0], analysis.CLAIMS[1]
    assert analysis.judge(c1, [_interval(0.01, 0.2), _interval(0.02, 0.1)]) == "held"
    assert analysis.judge(c1, [_interval(0.01, 0.2), _interval(-0.01, 0.1)]) == "not shown"  # one template only
    assert analysis.judge(c1, [_interval(0.01, 0.2), _interval(-0.2, -0.01)]) == "not held"
    assert analysis.judge(c2, [_interval(-0.04, 0.02), _interval(-0.049, 0.0)]) == "held"  # within the margin
    assert analysis.judge(c2, [_interval(-0.06, 0.02), _interval(-0.03, 0.0)]) == "not shown"
    assert analysis.judge(c2, [_interval(-0.2, -0.06), _interval(-0.03, 0.0)]) == "not held"
    assert [c.key for c in analysis.CLAIMS] == ["C1", "C2", "C3", "C4"]
    assert (analysis.CLAIMS[3].a, analysis.CLAIMS[3].b) == ("frozen", "cipo")


def _rates(values: list[float], prefix: str = "p") -> dict[str, float]:
    return {f"{prefix}{i}": v for i, v in enumerate(values)}


def _seed_measures(shift: float, problems: int = 40) -> dict[str, dict[str, dict[str, float]]]:
    rng = np.random.default_rng(int(shift * 1000) + problems)
    base = {name: _rates(list(rng.uniform(0.2, 0.6, problems))) for name in ("fix_T", "fix_N", "heldout")}
    base |= {name: _rates(list(rng.uniform(0.8, 1.0, problems))) for name in ("keep_T", "keep_N")}
    for template in ("T", "N"):
        base[f"bal_{template}"] = {k: (base[f"fix_{template}"][k] + base[f"keep_{template}"][k]) / 2
                                   for k in base[f"fix_{template}"]}
    better = {name: {k: v + (shift if not name.startswith("keep") else 0.0) for k, v in rates.items()}
              for name, rates in base.items()}
    return {"grpo": base, "frozen": base, "cipo": better}


def test_claims_are_pooled_over_three_seeds_and_wait_before() -> None:
    two = {f"seed{s}": _seed_measures(0.1 + 0.01 * s) for s in range(2)}
    results = analysis.evaluate_claims(two)
    assert [r.verdict for r in results] == ["waiting"] * 4
    assert results[0].per_seed == {"seed0": "held", "seed1": "held"}
    three = {f"seed{s}": _seed_measures(0.1 + 0.01 * s) for s in range(3)}
    verdicts = {r.claim.key: r.verdict for r in analysis.evaluate_claims(three)}
    assert verdicts["C1"] == "held" and verdicts["C4"] == "held"
    assert verdicts["C2"] == "held"  # keep unchanged: within the margin
    c1 = analysis.evaluate_claims(three)[0].comparisons[0]
    assert c1.signs is not None and c1.signs.beyond == 3 and c1.pooled.estimate == pytest.approx(0.11)


def test_model_measures_pair_roles_on_the_same_problem() -> None:
    def results(name: str, rewards: list[list[float]]) -> dict:
        return {"benchmarks": {name: {"problems": [{"id": f"p{i}", "rewards": r} for i, r in enumerate(rewards)]}}}

    parts = {"answers": results("heldout", [[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]),
             "trained": {"benchmarks": {**results("fix_trained", [[1, 1, 0, 0], [0, 0, 0, 0]])["benchmarks"],
                                        **results("keep_trained", [[1, 1, 1, 1], [1, 0, 0, 0]])["benchmarks"]}}}
    measures = analysis.model_measures(parts, ["p0", "p1"])
    assert measures["plain"] == {"p0": 0.25, "p1": 1.0}
    assert measures["bal_T"] == {"p0": 0.75, "p1": 0.125}
    assert measures["anchor_fix_T"] == {"p0": 0.25, "p1": -1.0}
    assert "fix_N" not in measures and "bal_N" not in measures  # the reworded part has not run


# ---------------------------------------------------------------------------------------------- power


def test_power_by_the_normal_approximation() -> None:
    se = analysis.standard_error(0.2, problems=100, seeds=4, seed_sd=0.0)
    assert se == pytest.approx(0.2 / 20)
    assert analysis.standard_error(0.2, problems=100, seeds=4, seed_sd=0.04) == pytest.approx(
        np.sqrt(0.01**2 + 0.02**2))
    assert analysis.power(analysis.detectable_effect(se), se) == pytest.approx(0.8)
    assert analysis.power(0.0, se) == pytest.approx(0.025)
    assert analysis.power(-0.05, se, threshold=-0.05) == pytest.approx(0.025)  # non-inferiority at its margin


@pytest.mark.parametrize(("seeds", "seed_sd"), [(5, 0.0), (3, 0.05)])
def test_the_simulated_bootstrap_matches_its_expected_interval_width(seeds: int, seed_sd: float) -> None:
    shape = {"problems": 100, "seeds": seeds, "seed_sd": seed_sd}
    se, interval_se = analysis.standard_error(0.2, **shape), analysis.bootstrap_standard_error(0.2, **shape)
    # agreeing seeds: the bootstrap counts problem noise twice (wider); disagreeing few seeds: too narrow
    assert (interval_se > se) if seed_sd == 0 else (interval_se < se)
    effect = analysis.detectable_effect(se, interval_se=interval_se)
    simulated = analysis.simulated_power(effect, 0.2, **shape, replicates=150, resamples=400)
    assert simulated == pytest.approx(0.8, abs=0.12)
    if seed_sd == 0:
        assert analysis.power(effect, se) > 0.9  # the plain normal formula would promise far more


def test_spreads_rescale_the_sampling_noise_to_the_planned_samples() -> None:
    a = {f"p{i}": [1.0] * 2 + [0.0] * 6 for i in range(20)}
    b = {f"p{i}": [1.0] * (2 + i % 3) + [0.0] * (6 - i % 3) for i in range(20)}
    spread = analysis.spread_from(a, b, "fix")
    assert spread.samples == 8 and spread.problems == 20
    assert spread.observed == pytest.approx(np.mean([(i % 3) / 8 for i in range(20)]))
    assert spread.sd_at(4) > spread.sd > spread.sd_at(16)
    assert spread.sd_at(8) == pytest.approx(spread.sd)


def test_the_power_table_comes_from_seed_0s_results() -> None:
    seed0 = REPO / "docs" / "results" / "study_instruct" / "seed0"
    grpo, cipo = (json.loads((seed0 / arm / "results.json").read_text()) for arm in ("grpo", "cipo"))
    spreads = analysis.seed0_spreads(grpo, cipo)
    assert spreads["fix"].problems == 41 and spreads["keep"].problems == 23 and spreads["heldout"].problems == 64
    assert spreads["fix"].observed == pytest.approx(0.106, abs=5e-4)  # as docs/results/study_instruct.md reports
    table = analysis.power_table(spreads, problems={"heldout": 384, "fix": 128, "keep": 128, "bal": 128}, samples=16,
                                 replicates=0)
    assert len(table["rows"]) == 4 * 2 * 3 and all(row["simulated_power"] is None for row in table["rows"])
    keep = [row for row in table["rows"] if row["measure"].startswith("right->right")]
    assert all(row["effect"] == 0.0 for row in keep)
    assert min(row["power"] for row in keep if row["seed_sd"] == 0.0) > 0.9
    held_out = [row for row in table["rows"] if row["measure"].startswith("held-out")]
    assert held_out[0]["size"] < 0.025 < held_out[2]["size"]  # conservative when seeds agree, not when they differ


# ---------------------------------------------------------------------------------------------- registration


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def _repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "t@example.com")
    _git(repo, "config", "user.name", "t")
    (repo / "README").write_text("x\n")
    _git(repo, "add", "README")
    _git(repo, "commit", "-q", "-m", "start")
    return repo


def _registration() -> dict:
    return {"design": Design().as_dict(), "config_sha256": {}, "claims": [], "analysis_blob_sha1": {
        module.name: registration.blob_hash(module) for module in registration.ANALYSIS_MODULES}}


def _finish_unit(results: Path, name: str, code_commit: str, *, started: float | None = None) -> Path:
    directory = results / name
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime(registration.TIME_FORMAT, time.gmtime(time.time() if started is None else started))
    (directory / registration.DONE_FILE).write_text(json.dumps({"code_commit": code_commit, "started": stamp}))
    return directory


def _check(results: Path) -> registration.PrecedenceCheck:
    return registration.check_precedence(results, registration.load_registration(results))


def test_the_report_checks_with_git_that_the_registration_came_first(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    before = _git(repo, "rev-parse", "HEAD")
    results = repo / "results"
    registration.write_registration(results, _registration())
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "registration")
    registered = _git(repo, "rev-parse", "HEAD")
    _finish_unit(results, "seed0/grpo/train1", registered)
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "results")
    check = _check(results)
    assert check.registration_commit == registered and not check.refused and not check.uncommitted
    assert "all 1 finished units ran at commits that descend from it" in "\n".join(check.lines())

    assert registration.tree_changed(results) is False
    (repo / "README").write_text("changed\n")
    assert registration.tree_changed(results) is True
    record = json.loads((results / "seed0/grpo/train1" / registration.DONE_FILE).read_text())
    (results / "seed0/grpo/train1" / registration.DONE_FILE).write_text(json.dumps(record | {"code_dirty": True}))
    assert _check(results).dirty == ["seed0/grpo/train1"]
    _finish_unit(results, "seed0/cipo/train1", before)  # ran at a commit before the registration
    _finish_unit(results, "seed0/frozen/train1", "f" * 40)  # a commit git does not know
    _finish_unit(results, "seed0/start/answers", registered)  # not committed yet: accepted, and said so
    check = _check(results)
    assert sorted(check.refused) == ["seed0/cipo/train1", "seed0/frozen/train1"]
    assert check.uncommitted == ["seed0/start/answers"]
    assert "does not descend from the registration" in check.refused["seed0/cipo/train1"]
    assert "a commit git does not know here" in check.refused["seed0/frozen/train1"]
    assert "**2 unit(s) refused and left out of the analysis**" in "\n".join(check.lines())


def test_a_unit_that_started_before_the_registrations_commit_time_is_refused(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    results = repo / "results"
    registration.write_registration(results, _registration())
    _git(repo, "add", ".")
    committed_at = time.time() + 3600  # the registration's commit time, an hour from now
    subprocess.run(["git", "-C", str(repo), "commit", "-q", "-m", "registration"], check=True,
                   env={**os.environ, "GIT_COMMITTER_DATE": f"@{int(committed_at)} +0000"})
    registered = _git(repo, "rev-parse", "HEAD")
    _finish_unit(results, "seed0/grpo/answers", registered)  # its code commit is the registration, its time earlier
    _finish_unit(results, "seed0/cipo/answers", registered, started=committed_at + 1)
    unstamped = _finish_unit(results, "seed0/frozen/answers", registered)
    (unstamped / registration.DONE_FILE).write_text(json.dumps({"code_commit": registered}))
    check = _check(results)
    assert sorted(check.refused) == ["seed0/frozen/answers", "seed0/grpo/answers"]
    assert "before the registration's commit time" in check.refused["seed0/grpo/answers"]
    assert check.refused["seed0/frozen/answers"] == "records no start time"


def test_a_registration_committed_only_on_another_branch_precedes_nothing(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    start = _git(repo, "rev-parse", "HEAD")
    results = repo / "results"
    _git(repo, "checkout", "-q", "-b", "elsewhere")
    registration.write_registration(results, _registration())
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "registration on another branch")
    elsewhere = _git(repo, "rev-parse", "HEAD")
    _git(repo, "checkout", "-q", start)  # HEAD's history holds no registration; the file stays (untracked here)
    registration.write_registration(results, _registration())
    _finish_unit(results, "seed0/grpo/answers", elsewhere)
    check = _check(results)
    assert check.registration_commit is None
    assert check.refused == {"seed0/grpo/answers": "the registration is not committed"}
    assert "**The registration is not committed**" in "\n".join(check.lines())


def test_results_committed_with_or_before_a_changed_registration_are_flagged(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    results = repo / "results"
    registration.write_registration(results, _registration())
    _finish_unit(results, "seed0/grpo/answers", _git(repo, "rev-parse", "HEAD"))
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "registration and a result together")
    _finish_unit(results, "seed0/cipo/answers", _git(repo, "rev-parse", "HEAD"))
    check = _check(results)
    assert "does not descend from the registration" in check.refused["seed0/grpo/answers"]
    # its code commit made to look right: the commit that added its results still gives it away
    record = {"code_commit": _git(repo, "rev-parse", "HEAD"),
              "started": time.strftime(registration.TIME_FORMAT, time.gmtime(time.time() + 2))}
    (results / "seed0/grpo/answers" / registration.DONE_FILE).write_text(json.dumps(record))
    _git(repo, "commit", "-qam", "a result rewritten")
    assert _check(results).refused["seed0/grpo/answers"] == "its results were committed together with the registration"
    # a registration edited after the results: its latest commit no longer precedes them
    changed = _registration() | {"claims": ["edited"], "analysis_blob_sha1": {"analysis.py": "0" * 40}}
    (results / registration.REGISTRATION_FILE).write_text(json.dumps(changed))
    _git(repo, "commit", "-qam", "registration changed")
    check = _check(results)
    assert check.registration_commits == 2 and check.analysis_changed == ["analysis.py", "report.py",
                                                                          "registration.py"]
    assert "does not descend from the registration" in check.refused["seed0/cipo/answers"]
    assert "The analysis code changed since the registration" in "\n".join(check.lines())


def test_no_unit_runs_before_the_registration_is_committed_and_matches(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    results = repo / "results"
    design = Design(seeds=(0,))
    with pytest.raises(SystemExit, match="no registration"):
        registration.check_before_running(design, results)
    configs = registered_configs(design)
    registered = {"design": design.as_dict(), "config_sha256": registered_fingerprints(design), "configs": configs}
    registration.write_registration(results, registered)
    with pytest.raises(SystemExit, match="not committed"):
        registration.check_before_running(design, results)
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "registration")
    registration.check_before_running(design, results)  # committed and matching: no error
    with pytest.raises(SystemExit, match="differ from the registered ones in seeds, steps"):
        registration.check_before_running(Design(seeds=(0, 1), steps=5), results)
    # the registration as if the code had then resolved the GRPO arm with another KL coefficient
    configs["grpo"]["loss"]["kl_beta"] = 0.5
    registered["config_sha256"]["grpo"] = "0" * 64
    registration.write_registration(results, registered)
    _git(repo, "commit", "-qam", "registration with another config")
    with pytest.raises(SystemExit, match=r"config of grpo differs from the registered one \(grpo: loss.kl_beta\)"):
        registration.check_before_running(design, results)
    _finish_unit(results, "seed0/grpo/train1", "x")
    with pytest.raises(SystemExit, match="cannot change after the first unit"):
        registration.write_registration(results, {"design": {}})


def test_a_config_difference_is_told_key_by_key() -> None:
    registered = {"loss": {"kl_beta": 0.0, "clip": 0.2}, "cipo": {"enabled": True}}
    now = {"loss": {"kl_beta": 0.1, "clip": 0.2}, "cipo": {"enabled": True, "anchor_source": "policy"}}
    assert changed_keys(registered, now) == ["cipo.anchor_source", "loss.kl_beta"]
    assert changed_keys(now, now) == []


# ---------------------------------------------------------------------------------------------- units


def test_the_units_their_order_and_sizes() -> None:
    design = Design(seeds=(0, 1), steps=100, part_steps=40)
    plan = units.plan_units(design, training_items=1001)
    names = [unit.name for unit in plan]
    assert names[:3] == ["attempts/part1", "attempts/part2", "seed0/start/answers"]
    assert names[3:6] == ["seed0/grpo/train1", "seed0/grpo/train2", "seed0/grpo/train3"]
    assert [u.work for u in plan if u.kind == "train" and u.name.startswith("seed0/grpo/")] == [40, 40, 20]
    assert names[-2:] == ["seed1/start/trained", "seed1/start/reworded"]
    assert sum(u.work for u in plan if u.kind == "attempts") == 1001 * 16
    answers = next(u for u in plan if u.name == "seed0/cipo/answers")
    assert answers.work == 384 * 16 and next(u for u in plan if u.name == "seed0/cipo/reworded").work == 2 * 128 * 16
    assert len(plan) == 2 + 2 * (1 + 3 * (3 + 3) + 2)


def test_the_estimates_use_finished_units_and_checkpoints(tmp_path: Path) -> None:
    design = Design(seeds=(0,), steps=100, part_steps=50)
    paths = units.Paths(results_dir=tmp_path / "results", output_dir=tmp_path / "out")
    plan = units.plan_units(design, training_items=100)
    before = {u.name: (s, m) for u, s, m in units.remaining(plan, paths, design)}
    assert before["seed0/cipo/train1"] == (50 * units.PRIOR_SECONDS["train:cipo"], False)
    for name, seconds, work in (("seed0/cipo/train1", 1000.0, 50), ("seed0/start/answers", 512.0, 5120)):
        directory = paths.results_dir / name
        directory.mkdir(parents=True)
        (directory / registration.DONE_FILE).write_text(json.dumps({"seconds": seconds, "work": work}))
    checkpoint = paths.run_dir(0, "cipo") / "checkpoints" / "step_000070"
    checkpoint.mkdir(parents=True)
    (checkpoint / "COMPLETE").write_text("70\n")
    after = {u.name: (s, m) for u, s, m in units.remaining(plan, paths, design)}
    assert "seed0/cipo/train1" not in after
    assert after["seed0/cipo/train2"] == (pytest.approx(30 * 20.0), True)  # 20 of its 50 steps are checkpointed
    assert after["seed0/frozen/train1"] == (pytest.approx(50 * 20.0), True)  # the frozen step is CIPO's step
    assert after["seed0/grpo/answers"] == (pytest.approx(384 * 16 * 0.1), True)  # 0.1 s a sample
    lines = units.status_lines(plan, paths, design)
    assert lines[0].startswith(f"2 of {len(plan)} units done")
    assert any("seed0/cipo/train2" in line and "(20 of 50 steps already checkpointed)" in line for line in lines)
    assert any(line.startswith("  seed0/grpo/train1") and line.endswith("(prior)") for line in lines)


def test_one_start_model_for_every_unit(tmp_path: Path) -> None:
    paths = units.Paths(results_dir=tmp_path, output_dir=tmp_path / "out")
    plan = units.plan_units(Design(seeds=(0,)), training_items=10)
    directory = plan[2].directory(tmp_path)
    directory.mkdir(parents=True)
    (directory / registration.DONE_FILE).write_text(json.dumps({units.START_MODEL_KEY: "aaa"}))
    units.check_one_start_model(plan, paths, "aaa")
    with pytest.raises(SystemExit, match="ran from start weights aaa, but the start model now has bbb"):
        units.check_one_start_model(plan, paths, "bbb")


def test_the_correction_set_takes_the_first_problems_with_both_kinds_of_attempt() -> None:
    pool = [TaskItem(id=f"p{i}", family="math", prompt=f"q{i}", messages=None, answer="1", origin="x", metadata={})
            for i in range(5)]
    samples = [{"benchmark": "heldout", "id": f"p{i}", "responses": [f"r{i}a", f"r{i}b", f"r{i}c"],
                "rewards": rewards}
               for i, rewards in enumerate([[1, 1, 1], [0, 1, 0], [0, 0, 0], [1, 0, 0], [0, 1, 1]])]
    chosen = select_correction_set(pool, samples, count=2, seed=3)
    assert [entry["id"] for entry in chosen] == ["p1", "p3"]
    assert chosen[0]["right"] == "r1b" and chosen[0]["wrong"] in ("r1a", "r1c") and chosen[1]["right"] == "r3a"
    assert select_correction_set(pool, samples, count=2, seed=3) == chosen
    with pytest.raises(SystemExit, match="only 3 of 5 held-out problems; the registered design needs 4"):
        select_correction_set(pool, samples, count=4, seed=3)
    fix, keep = correction_benchmarks(pool, chosen, suffix="reworded", template="T: {problem} {attempt}")
    assert (fix.name, keep.name) == ("fix_reworded", "keep_reworded") and [i.id for i in fix.items] == ["p1", "p3"]
    assert fix.attempts == [entry["wrong"] for entry in chosen]
    assert keep.attempts == [entry["right"] for entry in chosen]
    assert fix.attempt_correct == [False, False] and keep.attempt_correct == [True, True]
    assert fix.templates == keep.templates == ["T: {problem} {attempt}"] * 2
    assert correction_benchmarks(pool, chosen, suffix="trained")[0].templates == []  # the config's template


def test_budgets_parse() -> None:
    assert [study_corrections.parse_budget(text) for text in ("3h", "90m", "1h30m", "45")] == [10800, 5400, 5400, 45]
    with pytest.raises(Exception, match="write a duration"):
        study_corrections.parse_budget("soon")


# ---------------------------------------------------------------------------------------------- the report


def _results(benchmarks: dict[str, list[list[float]]]) -> dict:
    return {"benchmarks": {name: {"problems": [{"id": f"p{i}", "rewards": r} for i, r in enumerate(rows)]}
                           for name, rows in benchmarks.items()}}


def _write_model(seed_dir: Path, model: str, right: int, code_commit: str) -> None:
    """A model whose samples are right `right` times of 4 on wrong quotes, always on right quotes and plain."""
    parts = {"answers": {"heldout": [[1, 1, 0, 0]] * 30},
             "trained": {"fix_trained": [[1] * right + [0] * (4 - right)] * 30, "keep_trained": [[1, 1, 1, 1]] * 30},
             "reworded": {"fix_reworded": [[1] * right + [0] * (4 - right)] * 30,
                          "keep_reworded": [[1, 1, 1, 1]] * 30}}
    for kind, benchmarks in parts.items():
        directory = _finish_unit(seed_dir.parent, f"{seed_dir.name}/{model}/{kind}", code_commit)
        (directory / "results.json").write_text(json.dumps(_results(benchmarks)))
        record = json.loads((directory / registration.DONE_FILE).read_text())
        (directory / registration.DONE_FILE).write_text(json.dumps(record | {"seconds": 60.0}))


def test_the_report_renders_registration_verdicts_seeds_and_the_findings_placeholder(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    results = repo / "results"
    registration.write_registration(results, {**_registration(), "written": "today",
                                              "claims": [c.as_dict() for c in analysis.CLAIMS], "secondary": [],
                                              "measures": analysis.MEASURE_LABELS, "verdict_rules": "the rules",
                                              "config_sha256": {"grpo": "a" * 64}})
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "registration")
    registered = _git(repo, "rev-parse", "HEAD")
    for seed in range(4):
        seed_dir = results / f"seed{seed}"
        seed_dir.mkdir(parents=True)
        (seed_dir / units.CORRECTION_SET_FILE).write_text(json.dumps([{"id": f"p{i}"} for i in range(30)]))
        # seed 3 ran at a commit that does not follow the registration, and its CIPO corrects nothing: refused
        commit = registered if seed < 3 else "f" * 40
        for model, right in (("start", 1), ("grpo", 1), ("frozen", 2), ("cipo", 0 if seed == 3 else 2 + (seed == 2))):
            _write_model(seed_dir, model, right, commit)
        metrics = results / f"seed{seed}" / "cipo" / "train" / "metrics.jsonl"
        metrics.parent.mkdir(parents=True)
        metrics.write_text("".join(json.dumps({"step": s, "timing/step": 30.0, "val/reward_mean": 0.1 * s,
                                               "reward/base_mean": 0.5, "cipo/correction_success": 0.2,
                                               "cipo/anchors_failed": 3.0, "cipo/anchors_successful": 1.0,
                                               "tokens/generated": 100.0}) + "\n" for s in (1, 2)))
    text = write_report(results, tmp_path / "report.md").read_text()
    assert "**12 unit(s) refused and left out of the analysis**" in text and "- seed3/cipo/trained: ran at" in text
    assert "**Placeholder: not written yet.**" in text
    rows = {line.split("|")[1].strip()[:3]: line for line in text.splitlines() if line.startswith("| C")}
    assert rows["C1."].endswith("| **held** |")  # CIPO fixes 2-3 of 4, GRPO 1 of 4, on both templates (seeds 0-2)
    assert "fix_T 3 of 3 seeds" in rows["C1."]  # the refused seed 3 is not counted
    assert rows["C2."].endswith("| **held** |")  # both keep every right quote: within the margin
    assert rows["C4."].endswith("| **not shown** |")  # CIPO = frozen in two seeds of three: the interval touches 0
    assert "| start | 0.500 | 0.500 | 0.250 | 1.000 | 0.625 |" in text
    assert "| cipo | 2 | 30.0 |" in text and (tmp_path / "report_curves.png").is_file()
    assert "## seed3\n\nNo unit finished yet." in text  # none of its units is accepted
    (results / "findings.md").write_text("## Findings\n\nNothing was shown.\n")
    assert "Nothing was shown." in write_report(results, tmp_path / "report.md").read_text()


def test_without_a_committed_registration_the_report_uses_no_unit(tmp_path: Path) -> None:
    results = tmp_path / "results"  # no git repository at all
    registration.write_registration(results, {**_registration(), "written": "today", "claims": [], "secondary": [],
                                              "measures": {}, "verdict_rules": "", "config_sha256": {}})
    for seed in range(3):
        (results / f"seed{seed}").mkdir(parents=True)
        (results / f"seed{seed}" / units.CORRECTION_SET_FILE).write_text(json.dumps([{"id": "p0"}]))
        for model in ("grpo", "cipo"):
            _write_model(results / f"seed{seed}", model, 4 if model == "cipo" else 0, "a" * 40)
    text = write_report(results, tmp_path / "report.md").read_text()
    assert "**The registration is not committed**" in text and "all 18 finished units are left out" in text
    assert all(line.endswith("| **waiting** |") for line in text.splitlines() if line.startswith("| C"))
