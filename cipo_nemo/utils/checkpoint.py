"""Atomic checkpoints: written into a temporary directory and renamed when complete.

A crash mid-save leaves only a `.tmp-*` directory, which is never taken for a checkpoint and is cleaned up by the
next save; the last good checkpoint is untouched. A directory counts as a checkpoint only when it is named
`step_NNNNNN` and holds the COMPLETE marker, written last before the rename. `keep_last` complete checkpoints are
kept; older ones are deleted after a new one is in place.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

COMPLETE_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


class CheckpointManager:
    def __init__(self, root: Path, *, keep_last: int) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = root
        self.keep_last = keep_last

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Call `write(tmp_dir)` to fill a fresh directory, then publish it as step_NNNNNN atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()
        final = self.root / f"step_{step:06d}"
        tmp = self.root / f".tmp-step_{step:06d}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        write(tmp)
        (tmp / COMPLETE_MARKER).write_text(f"{step}\n")
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. on demand right after a periodic save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        self._prune()
        return final

    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = _STEP_DIR.match(path.name)
            if match and (path / COMPLETE_MARKER).is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | None:
        checkpoints = self.complete_checkpoints()
        return checkpoints[-1][1] if checkpoints else None

    def _prune(self) -> None:
        for _, path in self.complete_checkpoints()[: -self.keep_last]:
            shutil.rmtree(path)

    def _remove_stale_temporaries(self) -> None:
        for path in self.root.glob(".tmp-step_*"):
            shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    # Make the directory entries (the marker, the rename) durable before anyone relies on them.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
