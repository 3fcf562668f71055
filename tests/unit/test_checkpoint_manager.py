"""Atomic checkpoint directories: complete ones are found, partial ones never are, old ones are pruned."""

import pytest

from cipo_nemo.utils.checkpoint import COMPLETE_MARKER, CheckpointManager


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
