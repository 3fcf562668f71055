"""`cipo-nemo export` on bad input: one line on stderr naming the path, exit status 2, nothing written. (The export
itself, Megatron at TP2 and the HF backend, is tests/functional/test_export.py.)"""

from pathlib import Path

import pytest

from cipo_nemo import cli
from cipo_nemo.config import load_config, to_yaml
from cipo_nemo.utils.checkpoint import CheckpointManager

BASE = Path(__file__).resolve().parents[2] / "conf" / "cipo_base.yaml"


def _checkpoint(run: Path, model_name: str, *, config_text: str | None = None) -> Path:
    """A complete checkpoint as the trainer lays it out (policy/, config.yaml, COMPLETE), with no weights."""
    def write(directory: Path) -> None:
        (directory / "policy").mkdir()
        text = config_text if config_text is not None else to_yaml(load_config(BASE, [f"policy.model_name={model_name}"]))
        (directory / "config.yaml").write_text(text)

    return CheckpointManager(run / "checkpoints", keep_last=2).save(3, write)


@pytest.fixture
def base_model(tmp_path: Path) -> Path:
    model = tmp_path / "base"
    model.mkdir()
    (model / "config.json").write_text("{}")  # enough to count as the run's base model directory
    return model


def _export(capsys, *args: object) -> tuple[int, str]:
    status = cli.main(["export", *map(str, args)])
    return status, capsys.readouterr().err


def _assert_one_line(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_not_a_checkpoint(tmp_path, capsys):
    status, err = _export(capsys, tmp_path / "nowhere", tmp_path / "out")
    assert status == 2
    _assert_one_line(err, "nowhere does not exist")
    status, err = _export(capsys, tmp_path, tmp_path / "out")
    assert status == 2
    _assert_one_line(err, "is not a training checkpoint")
    assert not (tmp_path / "out").exists()


def test_a_run_directory_asks_for_one_of_its_checkpoints(tmp_path, base_model, capsys):
    _checkpoint(tmp_path / "run", str(base_model))
    status, err = _export(capsys, tmp_path / "run", tmp_path / "out")
    assert status == 2
    _assert_one_line(err, "is a run directory; pass one of its checkpoints")


def test_incomplete_checkpoint(tmp_path, base_model, capsys):
    checkpoint = _checkpoint(tmp_path / "run", str(base_model))
    (checkpoint / "COMPLETE").unlink()  # as a save cut short leaves it (its name aside)
    status, err = _export(capsys, checkpoint, tmp_path / "out")
    assert status == 2
    _assert_one_line(err, "step_000003 is an incomplete checkpoint (no COMPLETE marker")


def test_output_directory_that_is_not_empty(tmp_path, base_model, capsys):
    checkpoint = _checkpoint(tmp_path / "run", str(base_model))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("someone's file")
    status, err = _export(capsys, checkpoint, out)
    assert status == 2
    _assert_one_line(err, f"{out} exists and is not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_base_model_gone_and_unreadable_config(tmp_path, base_model, capsys):
    checkpoint = _checkpoint(tmp_path / "run", str(tmp_path / "moved_away"))
    status, err = _export(capsys, checkpoint, tmp_path / "out")
    assert status == 2
    _assert_one_line(err, "policy.model_name=", "moved_away", "is needed for the HF config and tokenizer")
    broken = _checkpoint(tmp_path / "run2", "", config_text="policy: {backend: megatron}\n")
    status, err = _export(capsys, broken, tmp_path / "out")
    assert status == 2
    _assert_one_line(err, "config.yaml: not a readable policy config: policy.model_name: Field required")


def test_a_checkpoint_from_before_a_policy_key_existed_still_reads(tmp_path, base_model):
    from cipo_nemo.models.policy.checkpoint_export import checkpoint_policy

    text = to_yaml(load_config(BASE, [f"policy.model_name={base_model}"]))
    old_text = "\n".join(line for line in text.splitlines() if "offload_optimizer_for_generation" not in line)
    assert old_text != text
    policy = checkpoint_policy(_checkpoint(tmp_path / "run", str(base_model), config_text=old_text))
    assert policy.offload_optimizer_for_generation == "auto"  # the base config's default
