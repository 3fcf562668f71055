"""The instruct-model study's pieces that need no model: paired bootstrap intervals, the pre-registered verdicts,
the report rebuilt from a results directory, units skipped when done, and the liveness metric it reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.studies import study_instruct
from benchmarks.studies.replication.paired import paired_difference, per_problem
from benchmarks.studies.replication.study_report import write_report
from cipo_nemo.data.batch import Batch
from cipo_nemo.eval.passk import pass_at_k
from cipo_nemo.algorithms.training_signal import correction_groups_live


def test_a_clear_per_problem_gain_has_an_interval_above_zero() -> None:
    a = {f"p{i}": 0.25 for i in range(40)}
    b = {f"p{i}": 0.25 + (0.5 if i % 2 else 0.25) for i in range(40)}
    d = paired_difference(a, b, statistic="avg")
    assert (d.problems, d.mean_a, d.difference) == (40, 0.25, pytest.approx(0.375))
    assert 0.25 < d.low < 0.375 < d.high < 0.5 and d.verdict == "B higher"


def test_noise_around_zero_is_no_difference_shown_and_only_shared_problems_count() -> None:
    a = {f"p{i}": 0.5 for i in range(30)}
    b = {f"p{i}": 0.5 + (0.25 if i % 2 else -0.25) for i in range(30)} | {"only_b": 1.0}
    d = paired_difference(a, b, statistic="avg")
    assert d.problems == 30 and d.difference == pytest.approx(0.0)
    assert d.low < 0 < d.high and d.verdict == "no difference shown"
    assert paired_difference(a, b, statistic="avg") == d  # a fixed bootstrap seed: the report is reproducible


def test_per_problem_statistics_match_the_harness_estimators() -> None:
    problems = [{"id": "x", "rewards": [1.0, 0.0, 0.0, 1.0]}, {"id": "y", "rewards": [0.0] * 4}]
    assert per_problem(problems, "avg") == {"x": 0.5, "y": 0.0}
    assert per_problem(problems, "pass@2") == {"x": pass_at_k(4, 2, 2), "y": 0.0}
    with pytest.raises(ValueError, match="unknown statistic"):
        per_problem(problems, "best@3")


def _results(heldout: list[list[float]], hard: list[list[float]], fix: list[list[float]],
             keep: list[list[float]]) -> dict:
    def records(name: str, rows: list[list[float]], **extra) -> list[dict]:
        return [{"id": f"{name}{i}", "rewards": r, **extra} for i, r in enumerate(rows)]

    correction = records("c", fix, solution_correct=False) + records("k", keep, solution_correct=True)
    return {"k": [1, 2, 4], "benchmarks": {"heldout": {"problems": records("h", heldout)},
                                           "hard": {"problems": records("d", hard)},
                                           "correction": {"problems": correction}}}


def _write_unit(results_dir: Path, unit: str, results: dict, metrics: list[dict] | None = None) -> None:
    directory = results_dir / "seed0" / unit
    directory.mkdir(parents=True)
    (directory / "results.json").write_text(json.dumps(results))
    (directory / "done.json").write_text("{}")
    if metrics is not None:
        (directory / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in metrics))


def test_the_report_applies_the_pre_registered_test(tmp_path: Path) -> None:
    worse, better = [[1, 0, 0, 0]] * 20, [[1, 1, 1, 0]] * 20
    grpo = _results(worse, [[0, 0, 0, 0]] * 20, worse, better)
    cipo = _results(better, [[1, 0, 0, 0]] * 20, better, better)
    metrics = [{"step": s, "tokens/generated": 100.0, "val/reward_mean": 0.1 * s, "cipo/correction_samples": 8.0,
                "cipo/correction_groups_live": 0.5, "cipo/rho_at_bound": 0.0, "cipo/anchors_failed": 2.0,
                "cipo/anchors_successful": 1.0, "cipo/anchors_truncated": 0.0} for s in (1, 2)]
    _write_unit(tmp_path, "start", grpo)
    _write_unit(tmp_path, "grpo", grpo, metrics[:1] + [{**metrics[1], "tokens/generated": 50.0}])
    _write_unit(tmp_path, "cipo", cipo, metrics)
    text = write_report(tmp_path, tmp_path / "report.md").read_text()
    assert "| 1. CIPO > GRPO, held-out avg@n, equal steps | held |" in text
    assert "| 2. gap at hard pass@4 > gap at pass@1 | held |" in text
    assert "| 3. wrong->right up, right->right not down | held |" in text
    assert "compared at 150." in text and "- cipo: val reward 0.100 at step 1" in text
    assert "- correction groups with a non-zero advantage (mean share): 0.500" in text


def test_an_unfinished_seed_is_reported_as_missing_not_guessed(tmp_path: Path) -> None:
    _write_unit(tmp_path, "start", _results([[0] * 4], [[0] * 4], [[0] * 4], [[1] * 4]))
    text = write_report(tmp_path, tmp_path / "report.md").read_text()
    assert "Not finished yet: grpo, cipo." in text and "claim" not in text


def test_a_finished_unit_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = study_instruct.parse_args(["--results-dir", str(tmp_path / "results"), "--output-dir", str(tmp_path / "out")])
    (study_instruct.unit_dir(args, 0, "grpo")).mkdir(parents=True)
    (study_instruct.unit_dir(args, 0, "grpo") / study_instruct.DONE_FILE).write_text("{}")

    def must_not_train(cfg):
        raise AssertionError("a finished arm was trained again")

    monkeypatch.setattr(study_instruct, "run_arm", must_not_train)
    study_instruct.run_unit(args, 0, "grpo", sets={}, fingerprint="abc")


def test_preregistration_is_written_once(tmp_path: Path) -> None:
    first = study_instruct.parse_args(["--results-dir", str(tmp_path), "--steps", "100"])
    study_instruct.preregister(first)
    written = (tmp_path / "preregistration.md").read_text()
    assert '"steps": "100"' in written and "bootstrap 95% interval" in written
    study_instruct.preregister(study_instruct.parse_args(["--results-dir", str(tmp_path), "--steps", "5"]))
    assert (tmp_path / "preregistration.md").read_text() == written


def test_correction_groups_live_counts_groups_that_send_a_gradient() -> None:
    batch = Batch({"group_id": torch.tensor([0, 0, 1, 1, 2, 2]),
                   "sample_kind": ["base", "base", "correction", "correction", "correction", "correction"],
                   "advantages": torch.tensor([0.5, -0.5, 0.0, 0.0, 0.7, -0.7])})
    assert correction_groups_live(batch) == 0.5
    base_only = Batch({"group_id": torch.tensor([0, 0]), "sample_kind": ["base", "base"],
                       "advantages": torch.tensor([1.0, -1.0])})
    assert correction_groups_live(base_only) is None


def test_a_claim_without_problems_is_not_testable(tmp_path: Path) -> None:
    no_corrections = _results([[1, 0, 0, 0]] * 8, [[0, 0, 0, 0]] * 8, [], [])
    _write_unit(tmp_path, "grpo", no_corrections)
    _write_unit(tmp_path, "cipo", no_corrections)
    text = write_report(tmp_path, tmp_path / "report.md").read_text()
    assert "| 3. wrong->right up, right->right not down | not testable | no problems for wrong->right, right->right |" \
        in text
    assert "| 1. CIPO > GRPO, held-out avg@n, equal steps | not shown |" in text


def test_the_report_shows_every_models_means_the_data_order_curves_and_findings(tmp_path: Path) -> None:
    start = _results([[0, 0, 0, 0]] * 4, [[0, 0, 0, 0]] * 4, [[0, 0, 0, 0]] * 2, [[1, 1, 1, 1]] * 2)
    grpo = _results([[1, 0, 0, 0]] * 4, [[0, 0, 0, 0]] * 4, [[1, 0, 0, 0]] * 2, [[1, 1, 0, 0]] * 2)
    metrics = [{"step": s, "tokens/generated": 10.0 * s, "reward/base_mean": 0.1 * s,
                "val/reward_mean": 0.2 if s == 2 else None} for s in (1, 2)]
    _write_unit(tmp_path, "start", start)
    _write_unit(tmp_path, "grpo", grpo, metrics)
    _write_unit(tmp_path, "cipo", grpo, metrics)
    for arm, order in (("grpo", [["a", "b"], ["c", "d"]]), ("cipo", [["a", "b"], ["c", "e"]])):
        (tmp_path / "seed0" / arm / "data_order.json").write_text(json.dumps(order))
        (tmp_path / "seed0" / arm / "val0.json").write_text(json.dumps({"val/reward_mean": 0.05}))
    (tmp_path / "findings.md").write_text("## What happened\n\nNothing moved.\n")
    text = write_report(tmp_path, tmp_path / "report.md").read_text()
    header = ("| model | held-out avg@n | held-out pass@4 | hard avg@n | hard pass@1 | hard pass@4 | wrong->right "
              "| right->right |")
    assert header in text
    assert "| start | 0.000 | 0.000 | 0.000 | 0.000 | 0.000 | 0.000 | 1.000 |" in text
    assert "| grpo | 0.250 | 1.000 | 0.000 | 0.000 | 0.000 | 0.250 | 0.500 |" in text
    assert "the first 2 batches are NOT the same prompts in the same order" in text
    assert "## What happened\n\nNothing moved." in text
    assert text.index("## What happened") < text.index("## seed0")
    assert "![validation and training reward per arm](report_seed0.png)" in text
    assert (tmp_path / "report_seed0.png").stat().st_size > 10_000


def test_a_seed_with_only_the_start_evaluated_draws_no_curves(tmp_path: Path) -> None:
    _write_unit(tmp_path, "start", _results([[1, 0, 0, 1]], [[0] * 4], [[0] * 4], [[1] * 4]))
    text = write_report(tmp_path, tmp_path / "report.md").read_text()
    assert "| start | 0.500 |" in text and ".png" not in text
    assert not (tmp_path / "report_seed0.png").exists()


def test_units_of_one_seed_must_come_from_the_same_start_weights(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights one")
    first = study_instruct.start_model_fingerprint(str(model))
    assert study_instruct.start_model_fingerprint("org/hub-id") == "org/hub-id"
    args = study_instruct.parse_args(["--results-dir", str(tmp_path / "results")])
    study_instruct.check_same_start_model(args, 0, first)  # nothing finished yet: nothing to compare
    start = study_instruct.unit_dir(args, 0, "start")
    start.mkdir(parents=True)
    (start / study_instruct.DONE_FILE).write_text(json.dumps({study_instruct.START_MODEL_KEY: first}))
    study_instruct.check_same_start_model(args, 0, first)

    (model / "model.safetensors").write_bytes(b"weights two")  # the warm-up redone on another machine
    second = study_instruct.start_model_fingerprint(str(model))
    assert second != first
    with pytest.raises(SystemExit, match=f"ran from start-model weights {first}, but the start model now has {second}"):
        study_instruct.check_same_start_model(args, 0, second)
    (start / study_instruct.DONE_FILE).write_text("{}")  # a unit finished before fingerprints were recorded
    with pytest.raises(SystemExit, match=r"weights \(not recorded\)"):
        study_instruct.check_same_start_model(args, 0, first)


def test_an_arm_stopped_early_is_not_evaluated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGTERM mid-arm leaves a checkpoint and no final policy: the unit must stop, not evaluate or be marked
    done."""
    from types import SimpleNamespace

    from benchmarks.studies.replication import arms
    from cipo_nemo.data.sampler import PromptSampler
    from cipo_nemo.loop import RunSummary

    args = study_instruct.parse_args(["--results-dir", str(tmp_path / "results"), "--output-dir", str(tmp_path / "out"),
                                      "--steps", "100"])
    cfg = study_instruct.arm_config(args, seed=0, arm="cipo")
    Path(cfg.run.output_dir).mkdir(parents=True)
    components = SimpleNamespace(sampler=PromptSampler.__new__(PromptSampler), start_step=10)
    monkeypatch.setattr(arms, "setup", lambda cfg: components)
    monkeypatch.setattr(arms, "validate", lambda components, step: {"val/reward_mean": 0.5})
    monkeypatch.setattr(arms, "shutdown", lambda components: None)
    monkeypatch.setattr(arms, "train", lambda components: RunSummary(
        run_dir=Path(cfg.run.output_dir), steps_done=7, last_metrics={}, plot=None, stopped_early="signal SIGTERM"))
    monkeypatch.setattr(study_instruct, "evaluate_unit", lambda *a, **k: pytest.fail("a stopped arm was evaluated"))
    with pytest.raises(SystemExit, match=r"stopped early \(signal SIGTERM\) after step 17 of 100; run the same"):
        study_instruct.run_unit(args, 0, "cipo", sets={}, fingerprint="abc")
    assert not (study_instruct.unit_dir(args, 0, "cipo") / study_instruct.DONE_FILE).exists()


def test_the_exploratory_correction_readings_count_the_problems_that_carry_each_difference(tmp_path: Path) -> None:
    # wrong attempts: 2 problems improve by 0.5, 1 worsens by 0.25, 3 stay equal; right attempts: 1 worsens, 1 stays
    grpo = _results([[0] * 4], [[0] * 4], [[0, 0, 0, 0]] * 2 + [[1, 0, 0, 0]] * 4, [[1, 1, 1, 1]] * 2)
    cipo = _results([[0] * 4], [[0] * 4], [[1, 1, 0, 0]] * 2 + [[0, 0, 0, 0]] + [[1, 0, 0, 0]] * 3,
                    [[1, 1, 1, 0], [1, 1, 1, 1]])
    _write_unit(tmp_path, "grpo", grpo)
    _write_unit(tmp_path, "cipo", cipo)
    text = write_report(tmp_path, tmp_path / "report.md").read_text()
    exploratory = text[text.index("Exploratory, post hoc"):]
    assert "not pre-registered, no verdict" in exploratory
    assert "- wrong->right: +0.125 [" in exploratory
    assert "non-zero on 3 of 6 problems (2 up, 1 down), exactly 0 on the other 3" in exploratory
    assert "- right->right: -0.125 [" in exploratory and "non-zero on 1 of 2 problems (0 up, 1 down)" in exploratory
    assert "- all correction prompts: +0.06" in exploratory and "non-zero on 4 of 8 problems (2 up, 2 down)" in exploratory
    # the verdict of claim 3 stays the registered one, whatever the exploratory lines say
    assert "| 3. wrong->right up, right->right not down | not shown |" in text
