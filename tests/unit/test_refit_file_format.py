"""The raw refit file (models/refit/shm_file.py): what the policy writes is what the engine maps, byte for byte."""

from pathlib import Path

import pytest
import torch

from cipo_nemo.models.refit.manifest import WeightSyncError
from cipo_nemo.models.refit.shm_file import REFIT_FILE_ALIGNMENT, load_refit_file, read_refit_index, write_refit_file


def test_round_trip_keeps_names_order_dtypes_shapes_and_values(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "embed.weight": torch.randn(7, 5, generator=generator),
        "norm.weight": torch.randn(5, generator=generator).to(torch.bfloat16),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.empty(0, 4),
        "ids": torch.arange(3, dtype=torch.int64),
    }
    path = tmp_path / "weights.bin"
    assert write_refit_file(path, tensors.items()) == len(tensors)
    loaded = load_refit_file(path)
    assert list(loaded) == list(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
        assert torch.equal(loaded[name], tensor), name
    assert all(entry["offset"] % REFIT_FILE_ALIGNMENT == 0 for entry in read_refit_index(path))


def test_a_view_writes_only_its_own_bytes(tmp_path: Path) -> None:
    """Exported weights are views into DDP's whole buffer; the file must not carry the buffer (torch.save of a view
    would), and a non-contiguous view arrives with its logical values."""
    buffer = torch.arange(1_000_000, dtype=torch.float32)
    views = {"slice": buffer[:10], "transposed": buffer[10:40].view(5, 6).t()}
    path = tmp_path / "weights.bin"
    write_refit_file(path, views.items())
    assert path.stat().st_size < 10_000
    loaded = load_refit_file(path)
    assert all(torch.equal(loaded[name], views[name]) for name in views)


def test_writing_a_loaded_view_leaves_the_file_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    write_refit_file(path, [("w", torch.ones(4))])
    load_refit_file(path)["w"].zero_()
    assert torch.equal(load_refit_file(path)["w"], torch.ones(4))


@pytest.mark.parametrize("content", [b"", b"short", b"x" * 100])
def test_a_file_that_is_not_a_refit_file_is_named_in_the_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    with pytest.raises(WeightSyncError, match="weights.pt is not a refit file"):
        load_refit_file(path)
