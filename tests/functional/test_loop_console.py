"""The loop as a user watches it, and started from another run: progress lines inside each step (stage, samples,
optimizer steps) and the stage timings at its end when stdout is not a terminal; checkpointing.resume_from
continues another run's checkpoint in a new run directory."""

import json
from pathlib import Path

import pytest

from cipo_nemo.config import load_config
from cipo_nemo.loop import train
from cipo_nemo.trainer import setup, shutdown

pytestmark = pytest.mark.slow  # the training loop end to end

BASE = Path(__file__).resolve().parents[2] / "conf" / "cipo_base.yaml"


def _run(model, run_dir: Path, *extra: str):
    overrides = [
        f"run.output_dir={run_dir}", "grpo.num_steps=2", "grpo.prompts_per_step=4", "grpo.samples_per_prompt=4",
        "cipo.samples_per_anchor=4", "cipo.max_anchors_per_step=4", "cipo.attempt_max_tokens=32",
        "data.train.kind=file", f"data.train.file.path={model.train_file}", "verifier.num_workers=1",
        f"policy.model_name={model.model_dir}", "policy.backend=hf", "policy.precision=fp32",
        "policy.micro_batch_size=8", "policy.max_total_sequence_length=384", "policy.train_global_batch_size=16",
        "generation.backend=hf", "generation.max_new_tokens=12", "checkpointing.save_every=1",
        "checkpointing.save_hf_at_end=false", "logger.tensorboard=false", "logger.plot=false", *extra,
    ]
    components = setup(load_config(BASE, overrides))
    try:
        return train(components)
    finally:
        shutdown(components)


def test_progress_lines_and_stage_timings_without_a_terminal(arithmetic_model, tmp_path, capsys):
    _run(arithmetic_model, tmp_path / "run")
    lines = capsys.readouterr().out.splitlines()
    assert not any("\r" in line for line in lines)  # no updating line when stdout is not a terminal
    step1 = [line for line in lines if line.startswith(("step 1/2", "  step 1/2"))]
    stages = [line.removeprefix("step 1/2 | ") for line in step1 if line.startswith("step 1/2 | ")]
    assert stages[:2] == ["rollout", "rollout: 16/16 samples"]
    assert stages.index("verify") < stages.index("train") < stages.index("refit")
    trained = [s for s in stages if s.startswith("train: ")]
    assert trained and trained[-1].endswith("optimizer steps")
    done, total = trained[-1].removeprefix("train: ").split()[0].split("/")
    assert len(trained) == int(total) and done == total  # one line per optimizer step
    (timings,) = [line for line in step1 if line.startswith("  step 1/2 stages: ")]
    for stage in ("rollout", "verify", "train", "refit"):
        assert f"{stage} " in timings and timings.split(f"{stage} ")[1].split("s")[0].replace(".", "").isdigit()
    # the step's summary line follows its timings
    assert lines.index(timings) < next(i for i, line in enumerate(lines) if line.startswith("step 1/2 | reward"))


def test_resume_from_another_runs_checkpoint(arithmetic_model, tmp_path):
    first = tmp_path / "first"
    _run(arithmetic_model, first, "grpo.num_steps=1")
    second = tmp_path / "second"
    summary = _run(arithmetic_model, second, f"checkpointing.resume_from={first}")
    records = [json.loads(line) for line in (second / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2]  # continued at the first run's step 1, in its own directory
    assert summary.steps_done == 1
    assert (second / "checkpoints" / "step_000002").is_dir()
    assert not (first / "checkpoints" / "step_000002").exists()  # the other run is left as it was
