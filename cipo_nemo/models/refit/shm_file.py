"""The CPU transport of the refit: one raw tensor file in /dev/shm that the engine's workers memory-map.

vLLM's `collective_rpc` cannot carry tensors (they arrive as nested lists), and a path was measured faster than
Ray's object store (1.3 s vs 4.6 s for SmolLM2-135M, docs/platform.md). The file holds the tensors' raw bytes,
each at a 64-byte aligned offset, then a JSON index (name, dtype, shape, offset) and a fixed trailer (index length,
magic). Written straight from the exported tensors (no owning copy first, no pickling, no zip CRC as torch.save
does) and read as views into one mapping: docs/notes/refit.md measured the difference.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import BinaryIO

import torch

from cipo_nemo.models.refit.manifest import WeightSyncError

logger = logging.getLogger(__name__)

SHARED_MEMORY_DIR = Path("/dev/shm")
REFIT_FILE_MAGIC = b"cipo-refit-raw-1"  # 16 bytes, the file's last ones
REFIT_FILE_ALIGNMENT = 64  # every tensor starts at a multiple: a view of any dtype is aligned
_TRAILER_BYTES = 8 + len(REFIT_FILE_MAGIC)
REFIT_FILE_PREFIX = "cipo_refit_"


def save_weights_for_refit(
    named_tensors: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor], directory: Path | None = None
) -> Path:
    """Write the tensors (each its own bytes only, contiguous) to a fresh refit file and return its path.

    The file goes to `directory`, else /dev/shm when it exists and has room, else the temp dir. The caller
    removes it with `remove_refit_file` once every engine has loaded it.
    """
    items = list(named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors)
    num_bytes = sum(t.numel() * t.element_size() for _, t in items)
    target = directory if directory is not None else _default_refit_dir(num_bytes)
    handle, name = tempfile.mkstemp(prefix=REFIT_FILE_PREFIX, suffix=".bin", dir=target)
    os.close(handle)
    path = Path(name)
    try:
        write_refit_file(path, items)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    logger.debug("staged %d tensors (%.1f MiB) for refit at %s", len(items), num_bytes / 2**20, path)
    return path


def write_refit_file(
    path: Path | str, named_tensors: Iterable[tuple[str, torch.Tensor]], *, in_place: bool = False
) -> int:
    """Stream `named_tensors` into `path` in the raw refit format (module docstring); returns the tensor count.

    Each tensor's own bytes are written (a view into a larger buffer writes only the view), so the exporter needs
    no owning copy first; a device tensor is copied to host memory one at a time. `in_place` overwrites an
    existing file's pages (and cuts it at its new end) instead of replacing them with fresh ones.
    """
    with open(path, "r+b" if in_place else "wb") as file:
        return _write_tensors(file, named_tensors)


def _write_tensors(file: BinaryIO, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    index = []
    offset = 0
    for name, tensor in named_tensors:
        host = tensor.detach().to("cpu").contiguous()
        padding = -offset % REFIT_FILE_ALIGNMENT
        file.write(bytes(padding))
        offset += padding
        raw = host.reshape(-1).view(torch.uint8).numpy()
        file.write(memoryview(raw))
        index.append({"name": name, "dtype": str(host.dtype).removeprefix("torch."), "shape": list(host.shape),
                      "offset": offset, "nbytes": raw.nbytes})
        offset += raw.nbytes
    encoded = json.dumps(index).encode()
    file.write(encoded)
    file.write(len(encoded).to_bytes(8, "little") + REFIT_FILE_MAGIC)
    file.truncate()
    return len(index)


class RefitStaging:
    """A writer's refit file whose memory pages stay allocated from one refit to the next.

    Every refit used to write a fresh file that the engine's load then removed, so each refit allocated (and the
    kernel zeroed) a whole model's worth of fresh tmpfs pages. On a VM that hands freed memory back to its host
    (free page reporting, as on this project's firecracker machines) touching such pages faults on the host too: in
    the training loop the 538 MB write of SmolLM2-135M took 1-3 s instead of 0.2 s (docs/notes/refit.md). Here the
    bytes go into one staging file per writer process, overwritten in place each refit and published under the
    refit's path as a hard link (atomically: a reader sees the whole file or none); removing that path removes the
    name only. The price: the file's memory stays allocated between refits (the refit needs it at its peak anyway).
    `close()` removes the file; one left by a killed process (its pid gone on this host) is removed by the next
    writer that starts in the same directory.
    """

    PREFIX = "cipo-refit-staging-"

    def __init__(self) -> None:
        self._path: Path | None = None

    def write(self, path: Path | str, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        path = Path(path)
        staging = self._staging_path(path.parent.parent)
        count = write_refit_file(staging, named_tensors, in_place=staging.exists())
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")  # writers sharing a filesystem
        try:
            os.link(staging, partial)
        except OSError:  # e.g. the refit directory is another filesystem's mount point: a copy
            shutil.copyfile(staging, partial)
        partial.replace(path)
        return count

    def _staging_path(self, directory: Path) -> Path:
        """This process's staging file in `directory` (the refit directories' parent, e.g. /dev/shm: it outlives
        each refit's own directory); a new directory moves it there."""
        if self._path is not None and self._path.parent == directory:
            return self._path
        self.close()
        _remove_stale_staging(directory)
        self._path = directory / f"{self.PREFIX}{socket.gethostname()}-{os.getpid()}"
        return self._path

    def close(self) -> None:
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            self._path = None


def _remove_stale_staging(directory: Path) -> None:
    """Remove staging files of this host's processes that no longer exist (a killed run leaves its file)."""
    for stale in directory.glob(f"{RefitStaging.PREFIX}{socket.gethostname()}-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _process_exists(int(pid)):
            stale.unlink(missing_ok=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def read_refit_index(path: Path | str) -> list[dict]:
    """The index of a refit file: one {name, dtype, shape, offset, nbytes} per tensor, in written order."""
    with open(path, "rb") as file:
        size = file.seek(0, os.SEEK_END)
        if size < _TRAILER_BYTES:
            raise WeightSyncError(f"{path} is not a refit file ({size} bytes)")
        file.seek(size - _TRAILER_BYTES)
        trailer = file.read(_TRAILER_BYTES)
        if trailer[8:] != REFIT_FILE_MAGIC:
            raise WeightSyncError(f"{path} is not a refit file (no {REFIT_FILE_MAGIC!r} trailer)")
        index_bytes = int.from_bytes(trailer[:8], "little")
        file.seek(size - _TRAILER_BYTES - index_bytes)
        return json.loads(file.read(index_bytes))


def load_refit_file(path: Path | str) -> dict[str, torch.Tensor]:
    """Map a refit file (no copy until a tensor is read): name -> a view of its bytes with its dtype and shape.
    The mapping is private: writing a view would not change the file."""
    index = read_refit_index(path)
    size = os.path.getsize(path)
    mapped = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    return {
        entry["name"]: mapped[entry["offset"] : entry["offset"] + entry["nbytes"]]
        .view(getattr(torch, entry["dtype"]))
        .view(entry["shape"])
        for entry in index
    }


def remove_refit_file(path: Path | str) -> None:
    Path(path).unlink(missing_ok=True)


def _default_refit_dir(num_bytes: int) -> Path:
    # A container's /dev/shm is often 64 MiB: fall back to the temp dir rather than fail mid-write.
    headroom = 64 * 2**20
    if SHARED_MEMORY_DIR.is_dir() and shutil.disk_usage(SHARED_MEMORY_DIR).free > num_bytes + headroom:
        return SHARED_MEMORY_DIR
    logger.warning("/dev/shm is missing or too small for %.1f MiB; staging in the temp dir", num_bytes / 2**20)
    return Path(tempfile.gettempdir())
