"""benchmarks/studies/study_corrections.py end to end on a random tiny model (HF backends, one seed, 2 steps per arm
in parts of 1 step): the registration refused until committed, every unit through the real loop and harness, the
frozen arm quoting the start model's attempts, units resumed and skipped, the status line, and the report's git check
that the registration came first."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks.studies import study_corrections
from cipo_nemo.models.tiny import build_tiny_model_dir

pytestmark = pytest.mark.slow  # the study end to end (the training loop, three arms)

BASE = Path(__file__).resolve().parents[2] / "conf" / "cipo_base.yaml"
ARMS = ("grpo", "cipo", "frozen")


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_the_study_registers_runs_in_units_and_reports(tmp_path: Path, capsys) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "t@example.com")
    _git(repo, "config", "user.name", "t")
    model = build_tiny_model_dir(tmp_path / "model")
    where = ["--results-dir", str(repo / "results"), "--output-dir", str(tmp_path / "out"),
             "--report-file", str(repo / "report.md")]
    design = ["--config", str(BASE), "--seeds", "0", "--steps", "2", "--part-steps", "1", "--prompts-per-step", "2",
              "--samples-per-prompt", "2", "--save-every", "1", "--eval-samples", "2", "--pool-problems", "8",
              "--correction-problems", "2", "--attempt-samples", "2", "--attempt-parts", "2", "--power-replicates", "0",
              f"policy.model_name={model}", "policy.backend=hf", "generation.backend=hf", "policy.precision=fp32",
              "generation.max_new_tokens=8", "policy.max_total_sequence_length=512", "verifier.num_workers=1",
              "data.train.reasoning_gym.size=20", "validation.every=0", "cipo.samples_per_anchor=2",
              "cipo.max_anchors_per_step=4", "verifier.custom=tests.functional.study_rewards:coin",
              "logger.samples_every=1"]
    assert study_corrections.main(["--register", *where, *design]) == 0
    with pytest.raises(SystemExit, match="not committed"):
        study_corrections.main(["--run", *where])
    _git(repo, "add", "results/registration.json")
    _git(repo, "commit", "-q", "-m", "registration")

    assert study_corrections.main(["--run", "--max-units", "3", *where]) == 0
    status = capsys.readouterr().out
    assert "3 of 20 units done; 17 to run" in status and "seed0/cipo/train1" in status
    assert study_corrections.main(["--run", *where]) == 0
    assert "20 of 20 units done; 0 to run" in capsys.readouterr().out

    results = repo / "results"
    seed = results / "seed0"
    for arm in ARMS:
        records = [json.loads(line) for line in (seed / arm / "train" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2], arm  # two parts of one step, the second resumed
        assert [json.loads((seed / arm / f"train{i}" / "done.json").read_text())["last_step"] for i in (1, 2)] == [1, 2]
        assert {"fix_trained", "keep_trained"} <= set(json.loads((seed / arm / "trained" / "results.json")
                                                                 .read_text())["benchmarks"])
    # the reworded evaluation quotes the same attempts in the template no arm trained on
    prompts = {kind: [json.loads(line)["prompt"] for line in
                      (tmp_path / "out" / "seed0" / "cipo" / kind / "samples.jsonl").read_text().splitlines()]
               for kind in ("trained", "reworded")}
    assert all("The student's answer was:" in prompt for prompt in prompts["reworded"])
    assert not any("The student's answer was:" in prompt for prompt in prompts["trained"])
    orders = [json.loads((seed / arm / "train" / "data_order.json").read_text()) for arm in ARMS]
    assert orders[0] == orders[1] == orders[2]
    configs = {json.loads((seed / arm / "train1" / "done.json").read_text())["config_sha256"] for arm in ARMS}
    assert len(configs) == 3

    # the frozen arm's correction prompts quote the start model's attempts at the same item, with the anchor's verdict
    attempts = {}
    for part in (1, 2):
        for line in (results / "attempts" / f"part{part}" / "attempts.jsonl").read_text().splitlines():
            row = json.loads(line)
            attempts[row["id"]] = list(zip(row["responses"], row["rewards"]))
    def corrections(arm: str) -> list[dict]:
        lines = [line for step in (1, 2)
                 for line in (seed / arm / "train" / "samples" / f"step_{step}.jsonl").read_text().splitlines()]
        return [record for record in map(json.loads, lines) if record["kind"] == "correction"]

    frozen, own = corrections("frozen"), corrections("cipo")
    assert frozen and own
    for record in frozen:  # the quoted attempt is stripped as cipo.strip_thinking does
        quoted = [text for text, reward in attempts[record["item_id"]]
                  if (reward > 0.5) == record["anchor"]["correct"] and text.strip() in record["prompt"]]
        assert quoted, record["prompt"]
    # the dump's anchor is the policy's sample that chose the anchor: CIPO quotes it, the frozen arm does not
    assert all(record["anchor"]["response"].strip() in record["prompt"] for record in own)
    distinct = [record for record in frozen if len(record["anchor"]["response"].strip()) > 5]  # not found by chance
    assert distinct and not any(record["anchor"]["response"].strip() in record["prompt"] for record in distinct)

    report = (repo / "report.md").read_text()
    assert "| C1. CIPO corrects wrong attempts" in report and "**Placeholder: not written yet.**" in report
    assert "Results not committed yet" in report
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "results")
    assert study_corrections.main(["--report", *where]) == 0
    report = (repo / "report.md").read_text()
    assert "all 20 finished units ran at commits that descend from it" in report
    assert "every committed result was committed after it" in report
