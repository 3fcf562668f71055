"""Atomic checkpoint directories: complete ones are found, partial ones never are, old ones are pruned, and the
best by a validation metric is kept (checkpointing.keep_best)."""

import json
import shutil

import pytest

from cipo_nemo.utils.checkpoint import (
    BEST_FILE,
    COMPLETE_MARKER,
    METRICS_FILE,
    CheckpointManager,
    checkpoint_problem,
)


def _writer(text):
    def write(directory):
        (directory / "state.txt").write_text(text)
    return write


def test_save_publishes_a_complete_directory(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    path = manager.save(3, _writer("three"))
    assert path.name == "step_000003"
    assert (path / "state.txt").read_text() == "three"
    assert (path / COMPLETE_MARKER).is_file()
    assert manager.latest() == path


def test_a_crash_mid_save_keeps_the_last_good_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    good = manager.save(2, _writer("good"))

    def crash(directory):
        (directory / "state.txt").write_text("half")
        raise KeyboardInterrupt("killed mid-save")

    with pytest.raises(KeyboardInterrupt):
        manager.save(4, crash)
    assert manager.latest() == good
    assert [step for step, _ in manager.complete_checkpoints()] == [2]
    # The next save removes the leftover temporary directory.
    manager.save(5, _writer("five"))
    assert not list((tmp_path / "ckpt").glob(".tmp-*"))


def test_directory_without_marker_is_not_a_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    (root / "step_000009").mkdir(parents=True)  # e.g. copied by hand, incomplete
    manager = CheckpointManager(root, keep_last=1)
    assert manager.latest() is None


def test_keep_last_prunes_the_oldest(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    for step in (1, 2, 3, 10):
        manager.save(step, _writer(str(step)))
    assert [step for step, _ in manager.complete_checkpoints()] == [3, 10]
    assert manager.latest().name == "step_000010"


def test_saving_the_same_step_again_replaces_it(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=3)
    manager.save(4, _writer("first"))
    path = manager.save(4, _writer("second"))
    assert (path / "state.txt").read_text() == "second"
    assert len(manager.complete_checkpoints()) == 1


# ----- keep_best ---------------------------------------------------------------------------------------------


def _save_with(manager, step, value, key="val/pass@1"):
    metrics = {"train/loss": 0.1, "val/reward_mean": None, key: value}  # a None metric is not stored
    return manager.save(step, _writer(str(step)), metrics=metrics)


def _steps(manager):
    return [step for step, _ in manager.complete_checkpoints()]


def _best_record(root):
    return json.loads((root / BEST_FILE).read_text())


def test_keep_best_keeps_the_best_besides_the_last(tmp_path):
    root = tmp_path / "ckpt"
    manager = CheckpointManager(root, keep_last=1, keep_best="val/pass@1")
    for step, value in ((1, 0.2), (2, 0.5), (3, 0.3), (4, 0.1)):
        _save_with(manager, step, value)
    assert _steps(manager) == [2, 4]  # the last one, and the best (step 2), which keep_last alone would delete
    assert _best_record(root) == {"metric": "val/pass@1", "mode": "max", "step": 2, "value": 0.5,
                                  "checkpoint": "step_000002"}
    assert manager.latest().name == "step_000004"  # resume still takes the latest
    _save_with(manager, 5, 0.75)  # a new best: the old one goes, the new one is also the last
    assert _steps(manager) == [5]
    assert _best_record(root)["step"] == 5


def test_checkpoint_metrics_file_holds_only_validation_metrics(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2, keep_best="val/pass@1")
    path = _save_with(manager, 3, 0.25)
    assert json.loads((path / METRICS_FILE).read_text()) == {"step": 3, "metrics": {"val/pass@1": 0.25}}
    # a step without validation stores no metrics file
    assert not (manager.save(4, _writer("4")) / METRICS_FILE).exists()


def test_keep_best_min_mode_and_ties_keep_the_earlier(tmp_path):
    root = tmp_path / "ckpt"
    manager = CheckpointManager(root, keep_last=1, keep_best="val/reward_mean", keep_best_mode="min")
    for step, value in ((1, 0.4), (2, 0.2), (3, 0.2), (4, 0.9)):
        _save_with(manager, step, value, key="val/reward_mean")
    assert _steps(manager) == [2, 4]
    assert _best_record(root)["step"] == 2 and _best_record(root)["mode"] == "min"


def test_checkpoints_without_the_metric_are_not_candidates(tmp_path):
    root = tmp_path / "ckpt"
    manager = CheckpointManager(root, keep_last=1, keep_best="val/pass@1")
    manager.save(1, _writer("1"))  # no metrics at all (an on-demand save between validations)
    assert not (root / BEST_FILE).exists()
    _save_with(manager, 2, 0.5)
    _save_with(manager, 3, 0.9, key="val/pass@4")  # another metric only: not a candidate either
    manager.save(4, _writer("4"), metrics={"val/pass@1": float("nan")})  # NaN never ranks
    assert _steps(manager) == [2, 4]
    assert _best_record(root)["step"] == 2


def test_best_survives_a_new_manager_as_on_resume(tmp_path):
    root = tmp_path / "ckpt"
    first = CheckpointManager(root, keep_last=1, keep_best="val/pass@1")
    _save_with(first, 1, 0.9)
    _save_with(first, 2, 0.1)
    resumed = CheckpointManager(root, keep_last=1, keep_best="val/pass@1")  # a new process, same directory
    assert resumed.best()[0] == 1
    _save_with(resumed, 3, 0.5)
    assert _steps(resumed) == [1, 3]
    assert _best_record(root)["step"] == 1


def test_without_keep_best_metrics_change_nothing(tmp_path):
    root = tmp_path / "ckpt"
    manager = CheckpointManager(root, keep_last=1)
    _save_with(manager, 1, 0.9)
    _save_with(manager, 2, 0.1)
    assert _steps(manager) == [2] and manager.best() is None and not (root / BEST_FILE).exists()


def test_checkpoint_problem_names_what_is_wrong(tmp_path):
    run = tmp_path / "run"
    manager = CheckpointManager(run / "checkpoints", keep_last=2)

    def full(directory):
        (directory / "config.yaml").write_text("run: {}\n")
        (directory / "policy").mkdir()

    good = manager.save(1, full)
    assert checkpoint_problem(good) is None
    assert "does not exist" in checkpoint_problem(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    assert "is not a directory" in checkpoint_problem(tmp_path / "file")
    assert "is a run directory; pass one of its checkpoints" in checkpoint_problem(run)
    (run / "checkpoints" / "step_000002").mkdir()
    assert "is an incomplete checkpoint" in checkpoint_problem(run / "checkpoints" / "step_000002")
    assert "is not a training checkpoint" in checkpoint_problem(tmp_path)
    shutil.rmtree(good / "policy")
    assert "checkpoint without policy" in checkpoint_problem(good)
