"""The policy's refit staging file (models/refit/shm_file.py `RefitStaging`): every refit publishes exactly its own
tensors at the refit's path, from one file whose memory is reused; nothing outlives the writer."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cipo_nemo.models.refit import shm_file as refit
from cipo_nemo.models.refit.shm_file import RefitStaging, load_refit_file, write_refit_file


def _tensors(scale: float, rows: int) -> dict[str, torch.Tensor]:
    return {"embed.weight": torch.full((rows, 8), scale), "norm.weight": torch.arange(8.0) * scale}


def _refit_path(root: Path, step: int) -> Path:
    """What the loop passes: a fresh directory per refit (models/refit/transfer.py refit_file) under the shared-memory root."""
    directory = root / f"cipo-refit-{step}"
    directory.mkdir()
    return directory / "weights.pt"


def _staging_files(root: Path) -> list[Path]:
    return sorted(root.glob(f"{RefitStaging.PREFIX}*"))


def _assert_loads(path: Path, expected: dict[str, torch.Tensor]) -> None:
    loaded = load_refit_file(path)
    assert list(loaded) == list(expected)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in expected.items())


def test_each_refit_publishes_its_own_tensors_from_one_reused_file(tmp_path: Path) -> None:
    staging = RefitStaging()
    published = []
    for step, tensors in enumerate([_tensors(1.0, rows=64), _tensors(2.0, rows=64), _tensors(3.0, rows=4)]):
        path = _refit_path(tmp_path, step)
        assert staging.write(path, tensors.items()) == len(tensors)
        _assert_loads(path, tensors)
        fresh = tmp_path / f"fresh-{step}.bin"
        write_refit_file(fresh, tensors.items())
        assert path.stat().st_size == fresh.stat().st_size  # a shorter refit cuts the old tail off
        published.append(path.stat().st_ino)
        assert published[-1] == _staging_files(tmp_path)[0].stat().st_ino  # a second name of the staging file
        path.unlink()  # the loop removes the refit's directory after the engines loaded it
        path.parent.rmdir()
    assert len(set(published)) == 1  # the same file (and its memory) every time
    assert [p.name for p in _staging_files(tmp_path)] == [f"{RefitStaging.PREFIX}{socket.gethostname()}-{os.getpid()}"]
    staging.close()
    assert _staging_files(tmp_path) == []


def test_a_published_refit_file_is_never_seen_half_written(tmp_path: Path) -> None:
    """The bytes go to the staging file; the refit's path appears only once they are all there."""
    path = _refit_path(tmp_path, 0)
    seen_during_write = []

    def tensors():
        yield "a", torch.ones(3)
        seen_during_write.append(path.exists())
        yield "b", torch.zeros(2)

    RefitStaging().write(path, tensors())
    assert seen_during_write == [False]
    assert path.exists() and list(path.parent.iterdir()) == [path]


def test_a_killed_writers_staging_file_is_removed_by_the_next_writer(tmp_path: Path) -> None:
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    stale = tmp_path / f"{RefitStaging.PREFIX}{host}-{int(dead.stdout)}"
    alive = tmp_path / f"{RefitStaging.PREFIX}{host}-{os.getppid()}"  # another live process's file stays
    other_host = tmp_path / f"{RefitStaging.PREFIX}elsewhere-{int(dead.stdout)}"  # pids of other hosts: unknown
    for path in (stale, alive, other_host):
        path.write_bytes(b"x" * 10)
    staging = RefitStaging()
    staging.write(_refit_path(tmp_path, 0), _tensors(1.0, rows=2).items())
    assert not stale.exists() and alive.exists() and other_host.exists()
    staging.close()


def test_without_hard_links_the_refit_file_is_a_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_link(*_: object, **__: object) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(refit.os, "link", no_link)
    staging = RefitStaging()
    path = _refit_path(tmp_path, 0)
    tensors = _tensors(5.0, rows=3)
    staging.write(path, tensors.items())
    _assert_loads(path, tensors)
    assert path.stat().st_ino != _staging_files(tmp_path)[0].stat().st_ino
    staging.close()
