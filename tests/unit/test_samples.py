"""The sample dump (samples/step_<N>.jsonl) and its reader `python -m cipo_nemo.samples` (issue 13 item 4)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cipo_nemo.algorithms.anchors import AnchorSelection
from cipo_nemo.algorithms.correction import join_streams
from cipo_nemo.algorithms.training_signal import carries_gradient, training_signal
from cipo_nemo.config import load_config
from cipo_nemo.data.batch import Batch
from cipo_nemo.data.sources import TaskItem
from cipo_nemo.models.interfaces import SampledResponse
from cipo_nemo.models.rollout import responses_to_batch
from cipo_nemo.models.tiny import build_tiny_tokenizer
from cipo_nemo.samples import (
    correction_outcome,
    format_samples,
    read_samples,
    sample_records,
    shorten,
    write_samples,
)

REPO = Path(__file__).resolve().parents[2]
ITEMS = [TaskItem(id=f"sums:{i}", family="math", prompt=f"What is {i} + 2?", messages=None, answer=str(i + 2),
                  origin=f"test:{i}", metadata={}) for i in (1, 3)]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def _batch(tokenizer, prompts: list[str], responses: list[list[tuple[str, str]]], *, item_indices: list[int],
           kind: str, rewards: list[float], reasons: list[str]):
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    sampled = [[SampledResponse(token_ids=tokenizer.encode(text), logprobs=[-1.0] * len(tokenizer.encode(text)),
                                finish_reason=finish) for text, finish in group] for group in responses]
    batch = responses_to_batch(prompt_ids, sampled, item_indices=item_indices, sample_kind=kind, tokenizer=tokenizer)
    batch["rewards"] = torch.tensor(rewards)
    batch["verifier_reason"] = reasons
    return batch


def _step_batch(tokenizer):
    """2 prompts x 2 samples; anchors: sample 0 (right) and sample 3 (wrong), each corrected twice."""
    base = _batch(tokenizer, ["What is 1 + 2?", "What is 3 + 2?"],
                  [[("\\boxed{3}", "stop"), ("\\boxed{4}", "stop")], [("\\boxed{6}", "length"), ("\\boxed{7}", "stop")]],
                  item_indices=[0, 1], kind="base", rewards=[1.0, 0.0, 0.0, 0.0],
                  reasons=["correct", "wrong_answer", "wrong_answer", "wrong_answer"])
    anchors = AnchorSelection(indices=[0, 3], anchor_correct=[True, False], in_window=[True, False],
                              prompt_accuracy={0: 0.5, 1: 0.0})
    corrections = _batch(tokenizer, ["fix 1 + 2", "fix 3 + 2"],
                         [[("\\boxed{3}", "stop"), ("\\boxed{9}", "stop")], [("\\boxed{5}", "stop"), ("\\boxed{8}", "stop")]],
                         item_indices=[0, 1], kind="correction", rewards=[1.0, 0.0, 1.0, 0.0],
                         reasons=["correct", "wrong_answer", "correct", "wrong_answer"])
    corrections["anchor_index"] = torch.tensor([0, 0, 1, 1])
    joined, _ = join_streams(base, corrections, anchors=anchors, rho=0.5)
    cfg = load_config(REPO / "conf" / "cipo_base.yaml")  # risk_penalty 1.0, advantage_mode stream
    batch = training_signal(joined, grpo=cfg.grpo, cipo=cfg.cipo, max_new_tokens=cfg.generation.max_new_tokens)
    batch["carries_gradient"] = carries_gradient(batch)
    return batch, anchors


def test_records_hold_what_a_person_needs(tokenizer) -> None:
    batch, anchors = _step_batch(tokenizer)
    records = sample_records(batch, anchors, items=ITEMS, tokenizer=tokenizer, step=7)
    assert [r["kind"] for r in records] == ["base"] * 4 + ["correction"] * 4
    first = records[0]
    assert (first["step"], first["index"], first["group_id"], first["item_id"], first["answer"]) == (7, 0, 0, "sums:1", "3")
    assert first["prompt"] == "What is 1 + 2?" and first["response"] == "\\boxed{3}"
    assert (first["reward"], first["verifier_reason"], first["finish_reason"]) == (1.0, "correct", "stop")
    assert first["advantage"] == pytest.approx(float(batch["advantages"][0]))
    assert records[2]["finish_reason"] == "length" and records[2]["item_id"] == "sums:3"
    assert "anchor" not in first and "outcome" not in first
    corrections = records[4:]
    assert [r["outcome"] for r in corrections] == ["kept", "broken", "fixed", "unfixed"]
    # the broken correction of a right anchor: raw 0, shaped 0 - lambda_risk = -1
    assert (corrections[1]["reward"], corrections[1]["shaped_reward"]) == (0.0, -1.0)
    assert corrections[0]["anchor"] == {"index": 0, "correct": True, "reward": 1.0, "verifier_reason": "correct",
                                        "response": "\\boxed{3}"}
    assert corrections[2]["anchor"]["response"] == "\\boxed{7}" and corrections[2]["anchor"]["correct"] is False
    assert corrections[2]["prompt"] == "fix 3 + 2"
    assert [r["advantage"] for r in corrections] == pytest.approx(batch["advantages"][4:].tolist())
    # the second prompt's group is all wrong: no advantage, no gradient; the dump says so
    assert [r["carries_gradient"] for r in records[:4]] == [True, True, False, False]


def test_a_batch_before_the_advantages_is_refused(tokenizer) -> None:
    batch, anchors = _step_batch(tokenizer)
    before_advantages = Batch({key: value for key, value in batch.items() if key != "advantages"})
    with pytest.raises(ValueError, match=r"lacks \['advantages'\]"):
        sample_records(before_advantages, anchors, items=ITEMS, tokenizer=tokenizer, step=1)
    with pytest.raises(ValueError, match="no AnchorSelection"):
        sample_records(batch, None, items=ITEMS, tokenizer=tokenizer, step=1)


def test_outcomes_follow_the_anchor_verdict_and_the_correction_reward() -> None:
    assert [correction_outcome(a, r) for a, r in ((True, 1.0), (True, 0.0), (False, 1.0), (False, 0.0))] == [
        "kept", "broken", "fixed", "unfixed"]
    assert correction_outcome(False, 0.5) == "unfixed"  # a success is a reward above 0.5


def test_write_and_read_back(tokenizer, tmp_path) -> None:
    batch, anchors = _step_batch(tokenizer)
    for step in (2, 10):
        path = write_samples(tmp_path, step, sample_records(batch, anchors, items=ITEMS, tokenizer=tokenizer, step=step))
    assert path == tmp_path / "samples" / "step_10.jsonl"
    assert len(path.read_text().splitlines()) == 8 and not list(tmp_path.glob("samples/*.partial"))
    assert read_samples(tmp_path)[0] == 10  # the latest step, by number (10 after 2)
    step, records = read_samples(tmp_path, 2)
    assert step == 2 and records[0]["step"] == 2 and len(records) == 8
    with pytest.raises(ValueError, match="no samples for step 3 .*steps with samples: 2, 10"):
        read_samples(tmp_path, 3)
    with pytest.raises(ValueError, match="no samples in"):
        read_samples(tmp_path / "elsewhere")


def test_shorten_keeps_head_and_tail() -> None:
    text = "A" * 100 + "\\boxed{42}"
    short = shorten(text, 30)
    assert short.startswith("A" * 20) and short.endswith("boxed{42}") and "[... 80 characters ...]" in short
    assert shorten("short", 30) == "short" and shorten(text, 0) == text


def test_format_marks_each_correction(tokenizer) -> None:
    batch, anchors = _step_batch(tokenizer)
    text = format_samples(sample_records(batch, anchors, items=ITEMS, tokenizer=tokenizer, step=3))
    assert text.splitlines()[0] == ("step 3: 4 base samples in 2 groups; 4 correction samples in 2 groups "
                                    "(fixed 1, broken 1, kept 1, unfixed 1)")
    lines = text.splitlines()
    sample_lines = [line for line in lines if line.startswith("  #")]
    assert [line.split()[1] for line in sample_lines[4:]] == ["KEPT", "BROKEN", "FIXED", "UNFIXED"]
    assert "shaped -1.00" in sample_lines[5]
    assert any(line.startswith("== correction group 3 | item sums:3 | answer 5 | anchor #3 (wrong, reward 0.00")
               for line in lines)
    assert "prompt: What is 1 + 2?" in lines and "anchor: \\boxed{7}" in lines
    only = format_samples(sample_records(batch, anchors, items=ITEMS, tokenizer=tokenizer, step=3), kind="correction")
    assert "== base" not in only and only.count("== correction") == 2


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cipo_nemo.samples", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_cli_prints_the_latest_step_and_filters(tokenizer, tmp_path) -> None:
    batch, anchors = _step_batch(tokenizer)
    for step in (1, 2):
        write_samples(tmp_path, step, sample_records(batch, anchors, items=ITEMS, tokenizer=tokenizer, step=step))
    latest = _cli(str(tmp_path))
    assert latest.returncode == 0, latest.stderr
    assert latest.stdout.startswith("step 2: ") and "BROKEN" in latest.stdout and "== base group 0" in latest.stdout
    first = _cli(str(tmp_path), "--step", "1", "--kind", "base")
    assert first.stdout.startswith("step 1: ") and "== correction" not in first.stdout and "KEPT" not in first.stdout
    missing = _cli(str(tmp_path), "--step", "5")
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.strip() == (f"error: no samples for step 5 in {tmp_path / 'samples'}; "
                                      "steps with samples: 1, 2")


def test_cli_reports_a_broken_line(tmp_path) -> None:
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "step_4.jsonl").write_text(json.dumps({"step": 4}) + "\n{oops\n")
    result = _cli(str(tmp_path))
    assert result.returncode == 2 and "step_4.jsonl:2: not a JSON object" in result.stderr
