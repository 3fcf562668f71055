"""benchmarks/studies/study_instruct.py end to end on a random tiny model (HF backends, 2 steps per arm): every unit
runs through the real loop and harness, its small results land in the results directory, the report is written
from them, and a second invocation skips every finished unit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.studies import study_instruct
from cipo_nemo.models.tiny import build_tiny_model_dir

pytestmark = pytest.mark.slow  # the study end to end (the training loop)

BASE = Path(__file__).resolve().parents[2] / "conf" / "cipo_base.yaml"


def test_the_study_runs_in_resumable_units(tmp_path: Path, capsys) -> None:
    model = build_tiny_model_dir(tmp_path / "model")
    argv = ["--config", str(BASE), "--steps", "2", "--prompts-per-step", "2", "--samples-per-prompt", "2",
            "--save-every", "1", "--heldout", "4", "--eval-n", "2", "--hard-options", '{"max_terms": 4}',
            "--output-dir", str(tmp_path / "out"), "--results-dir", str(tmp_path / "results"),
            "--report", str(tmp_path / "report.md"),
            f"policy.model_name={model}", "policy.backend=hf", "generation.backend=hf", "policy.precision=fp32",
            "generation.max_new_tokens=8", "policy.max_total_sequence_length=256", "verifier.num_workers=1",
            "data.train.reasoning_gym.size=20", "validation.every=0", "cipo.samples_per_anchor=2"]
    assert study_instruct.main(argv) == 0
    seed_dir = tmp_path / "results" / "seed0"
    for unit in ("start", "grpo", "cipo"):
        assert (seed_dir / unit / "done.json").is_file(), unit
    for arm in ("grpo", "cipo"):
        records = [json.loads(line) for line in (seed_dir / arm / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2]
        assert len(json.loads((seed_dir / arm / "data_order.json").read_text())) == 2
    assert json.loads((seed_dir / "grpo" / "data_order.json").read_text()) == \
        json.loads((seed_dir / "cipo" / "data_order.json").read_text())
    results = json.loads((seed_dir / "cipo" / "results.json").read_text())
    assert {"heldout", "hard", "correction"} <= set(results["benchmarks"])
    report = (tmp_path / "report.md").read_text()
    assert "## Pre-registration" in report and "| 1. CIPO > GRPO, held-out avg@n, equal steps |" in report
    assert "the first 2 batches are the same prompts in the same order" in report
    assert "| start |" in report and (tmp_path / "report_seed0.png").is_file()
    capsys.readouterr()
    assert study_instruct.main(argv) == 0
    assert capsys.readouterr().out.count("done before") == 3
