"""benchmarks/studies/replicate_cipo_vs_grpo.py --quick end to end: both arms train the same steps from the same warm
start on the same prompts in the same order, every model is evaluated, and the report, its table and its plots are
written."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "studies" / "replicate_cipo_vs_grpo.py"
sys.path.insert(0, str(REPO))

from benchmarks.studies.replication.settings import QUICK  # noqa: E402

pytestmark = pytest.mark.slow  # the replication study end to end (the training loop)

MODELS = ("warm", "grpo", "cipo")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("replication")
    report = root / "docs" / "cipo_vs_grpo.md"
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--ablations", "--output-dir", str(root / "out"), "--report",
         str(report)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    summaries = [json.loads((root / "out" / f"seed{seed}" / "summary.json").read_text()) for seed in QUICK.seeds]
    return root, report, summaries, completed.stdout


def test_both_arms_train_the_same_steps_from_the_same_start_and_data(quick_run):
    root, _, summaries, _ = quick_run
    assert len(summaries) == len(QUICK.seeds) >= 2
    for summary in summaries:
        grpo, cipo = summary["grpo"], summary["cipo"]
        assert [r["step"] for r in grpo["records"]] == [r["step"] for r in cipo["records"]] \
            == list(range(1, QUICK.rl_steps + 1))
        # recorded prompt ids: the same prompts in the same order, QUICK.prompts_per_step per step
        assert grpo["data_order"] == cipo["data_order"] and summary["same_data_order"]
        assert [len(batch) for batch in grpo["data_order"]] == [QUICK.prompts_per_step] * QUICK.rl_steps
        # same warm start, same sampling seed: the step-0 validation and the first step's rollouts are identical
        assert grpo["val0"] == cipo["val0"]
        assert grpo["records"][0]["reward/base_mean"] == cipo["records"][0]["reward/base_mean"]
        assert grpo["records"][0]["response_length/base_mean"] == cipo["records"][0]["response_length/base_mean"]
        configs = [(root / "out" / f"seed{summary['seed']}" / "runs" / arm / "config.yaml").read_text()
                   for arm in ("grpo", "cipo")]
        warm_dir = str(root / "out" / f"seed{summary['seed']}" / "warm_start")
        assert all(f"model_name: {warm_dir}" in config for config in configs)
        # only the switch differs between the arms' configs
        differing = [pair for pair in zip(*(c.splitlines() for c in configs)) if pair[0] != pair[1]]
        assert {line.strip() for pair in differing for line in pair} >= {"enabled: false", "enabled: true"}
        assert all("enabled" in a or "output_dir" in a or "name:" in a for a, _ in differing), differing
        # the correction stream ran in CIPO only
        assert all(r["cipo/anchors_total"] == 0 for r in grpo["records"])
        assert any(r["cipo/anchors_total"] > 0 for r in cipo["records"])
        assert cipo["records"][-1]["tokens/generated"] > 0


def test_every_model_is_evaluated_and_pass_at_k_is_monotone(quick_run):
    _, _, summaries, _ = quick_run
    k_list = [k for k in (1, 2, 4, 8, 16, 32) if k <= QUICK.eval_samples]
    for summary in summaries:
        for model in MODELS:
            evaluation = summary["eval"][model]
            for bench in ("heldout", "hard"):
                curve = [evaluation[bench]["pass@k"][str(k)] for k in k_list]
                assert all(0.0 <= v <= 1.0 for v in curve)
                assert curve == sorted(curve), (model, bench, curve)
                assert evaluation[bench]["pass@k"]["1"] == pytest.approx(evaluation[bench]["avg"])
            correction = evaluation["correction"]
            # the warm start's own attempts, a wrong and a right one alternately where it produced both
            assert correction["correction_success"]["problems"] + correction["retention"]["problems"] \
                == QUICK.heldout_problems
            assert correction["correction_success"]["problems"] > 0


def test_report_has_table_for_both_arms_and_all_seeds_and_plots(quick_run):
    _, report, summaries, stdout = quick_run
    text = report.read_text()
    for stem in ("training", "pass_at_k", "correction"):
        png = report.parent / f"cipo_vs_grpo_{stem}.png"
        assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"
        assert f"]({png.name})" in text
    number = r"\d\.\d{3}"
    for summary in summaries:
        for label in ("GRPO", "CIPO", "warm start"):
            row = re.search(rf"^\| {summary['seed']} \| {label} \|(.*)$", text, flags=re.MULTILINE)
            assert row is not None, (summary["seed"], label)
            cells = [cell.strip() for cell in row.group(1).strip(" |").split("|")]
            assert len(cells) == 6 and all(re.fullmatch(number, c) for c in cells[:5]), row.group(0)
            # right->right is "-" only when the warm start got no held-out problem right (nothing to keep)
            assert re.fullmatch(number, cells[5]) or cells[5] == "-", row.group(0)
    for label in ("GRPO", "CIPO", "CIPO - GRPO"):
        assert re.search(rf"^\| {label} \| [+-]?{number} ± {number} \|", text, flags=re.MULTILINE), label
    verdicts = json.loads((report.parent / "cipo_vs_grpo_verdicts.json").read_text())
    assert len(verdicts) == 3
    assert all(v["verdict"].split(" ")[0] in ("held", "not", "mixed") for v in verdicts)
    assert "python benchmarks/studies/replicate_cipo_vs_grpo.py --quick" in text
    assert stdout.count("[seed ") >= 3 * len(summaries)  # warm start + both arms, per seed


def test_the_risk_penalty_changes_training_from_the_same_start(quick_run):
    """Liveness of lambda_risk: default CIPO and cipo.risk_penalty=0 sample the same first step (same start and
    seeds) but must train differently. Under per-group std normalization (advantage_mode group) they were equal to
    every digit."""
    _, _, summaries, _ = quick_run
    first = summaries[0]
    (ablation,) = [a for a in first["ablations"] if a["override"] == "cipo.risk_penalty=0.0"]
    default, no_penalty = first["cipo"]["records"], ablation["records"]
    assert default[0]["reward/base_mean"] == no_penalty[0]["reward/base_mean"]  # the same rollouts at step 1
    assert default[0]["cipo/anchors_successful"] > 0
    differences = [abs(a[key] - b[key]) for a, b in zip(default, no_penalty)
                   for key in ("train/loss", "train/grad_norm")]
    assert max(differences) > 1e-6, differences
