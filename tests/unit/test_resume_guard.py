"""Which checkpoint a run starts from: its own latest, else checkpointing.resume_from; a checkpoint saved with
another model, cipo.enabled or policy layout stops the run with the differing keys unless resume: force."""

from pathlib import Path

import pytest

from cipo_nemo.__main__ import main as cli_main
from cipo_nemo.config import ConfigError, load_config, to_yaml
from cipo_nemo.utils.checkpoint import COMPLETE_MARKER, resume_checkpoint

BASE = Path(__file__).resolve().parents[2] / "conf" / "cipo_base.yaml"


def _config(run_dir: Path, *overrides: str):
    return load_config(BASE, [f"run.output_dir={run_dir}", *overrides])


def _fake_checkpoint(run_dir: Path, step: int, *overrides: str) -> Path:
    """A complete checkpoint directory as the trainer publishes it (only its config matters here)."""
    path = run_dir / "checkpoints" / f"step_{step:06d}"
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(to_yaml(_config(run_dir, *overrides)))
    (path / COMPLETE_MARKER).write_text(f"{step}\n")
    return path


def test_same_setup_resumes_from_the_latest(tmp_path):
    _fake_checkpoint(tmp_path, 1)
    latest = _fake_checkpoint(tmp_path, 2, "grpo.num_steps=9")  # other keys may change
    assert resume_checkpoint(_config(tmp_path)) == latest
    assert resume_checkpoint(_config(tmp_path, "checkpointing.resume=never")) is None


def test_changed_model_algorithm_or_layout_stops_with_the_diff(tmp_path):
    checkpoint = _fake_checkpoint(tmp_path, 3)
    cfg = _config(tmp_path, "policy.model_name=/models/other", "cipo.enabled=false",
                  "policy.megatron.tensor_parallel=2")
    with pytest.raises(ConfigError) as err:
        resume_checkpoint(cfg)
    lines = str(err.value).splitlines()
    assert lines[0].startswith(f"checkpointing: {checkpoint} was saved with a different setup")
    assert "checkpointing.resume=force" in lines[0]
    assert lines[1:] == [
        "  policy.model_name: 'HuggingFaceTB/SmolLM2-135M-Instruct' in the checkpoint, '/models/other' now",
        "  cipo.enabled: True in the checkpoint, False now",
        "  policy.megatron.tensor_parallel: 1 in the checkpoint, 2 now",
    ]
    forced = _config(tmp_path, "policy.megatron.pipeline_parallel=2", "checkpointing.resume=force")
    assert resume_checkpoint(forced) == checkpoint


def test_resume_from_another_run(tmp_path):
    other = tmp_path / "other"
    _fake_checkpoint(other, 1)
    latest = _fake_checkpoint(other, 4)
    run_dir = tmp_path / "new"
    assert resume_checkpoint(_config(run_dir, f"checkpointing.resume_from={other}")) == latest  # a run directory
    first = other / "checkpoints" / "step_000001"
    assert resume_checkpoint(_config(run_dir, f"checkpointing.resume_from={first}")) == first  # a checkpoint
    own = _fake_checkpoint(run_dir, 6)
    assert resume_checkpoint(_config(run_dir, f"checkpointing.resume_from={other}")) == own  # a requeue continues itself


def test_resume_from_is_checked_too(tmp_path):
    _fake_checkpoint(tmp_path / "other", 1, "cipo.enabled=false")
    with pytest.raises(ConfigError, match="cipo.enabled: False in the checkpoint, True now"):
        resume_checkpoint(_config(tmp_path / "new", f"checkpointing.resume_from={tmp_path / 'other'}"))
    with pytest.raises(ConfigError, match="is neither a complete checkpoint"):
        resume_checkpoint(_config(tmp_path / "new", f"checkpointing.resume_from={tmp_path / 'nothing'}"))
    with pytest.raises(ConfigError, match="checkpointing.resume_from: resume is 'never'"):
        _config(tmp_path / "new", "checkpointing.resume=never", f"checkpointing.resume_from={tmp_path}")


def test_dry_run_stops_in_the_preflight_with_the_diff(tmp_path, capsys):
    _fake_checkpoint(tmp_path, 2)
    status = cli_main(["--dry-run", "--config", str(BASE), f"run.output_dir={tmp_path}", "cipo.enabled=false"])
    assert status == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("config error: checkpointing:")
    assert err[1:] == ["config error:   cipo.enabled: True in the checkpoint, False now"]
