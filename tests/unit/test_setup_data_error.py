"""A data problem that only the tokenizer reveals (no prompt fits data.max_prompt_tokens) stops the run with one
line and exit 2, before any worker or Ray starts, not with a traceback: the preflight finds it once the tokenizer is
here (so the dry run does too: tests/unit/test_dry_run_stops.py), and setup would again."""

from __future__ import annotations

from pathlib import Path

import pytest

from cipo_nemo import __main__ as entry
from cipo_nemo import trainer
from cipo_nemo.models.tiny import build_tiny_model_dir

BASE = Path(__file__).resolve().parents[2] / "conf" / "cipo_base.yaml"


def test_no_prompt_that_fits_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def no_workers(*args, **kwargs):
        raise AssertionError("a worker was built for a run whose data cannot be used")

    monkeypatch.setattr(trainer, "build_cluster", no_workers)
    monkeypatch.setattr(trainer, "build_policy", no_workers)
    model = build_tiny_model_dir(tmp_path / "model")
    code = entry.main(["--config", str(BASE), f"policy.model_name={model}", "policy.backend=megatron",
                       "generation.backend=vllm", "data.max_prompt_tokens=8",
                       "data.train.reasoning_gym.size=4", f"run.output_dir={tmp_path / 'run'}",
                       "verifier.num_workers=1", "--ignore-memory-estimate"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("data error: ") and "data.max_prompt_tokens=8" in last
