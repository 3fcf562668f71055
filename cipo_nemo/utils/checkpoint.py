"""Atomic checkpoints: written into a temporary directory and renamed when complete.

A crash mid-save leaves only a `.tmp-*` directory, which is never taken for a checkpoint and is cleaned up by the
next save; the last good checkpoint is untouched. A directory counts as a checkpoint only when it is named
`step_NNNNNN` and holds the COMPLETE marker, written last before the rename. `keep_last` complete checkpoints are
kept; older ones are deleted after a new one is in place.

Which checkpoint a run starts from (`resume_checkpoint`): its own latest, else `checkpointing.resume_from`; one saved
with another model, `cipo.enabled` or policy layout stops the run with the differing keys unless
`checkpointing.resume: force`.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from cipo_nemo.config import ConfigError, MasterConfig

COMPLETE_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")
CHECKPOINTS_DIR = "checkpoints"
CONFIG_FILE = "config.yaml"
# What a checkpoint cannot silently change: the weights' model, the algorithm, and the policy's layout (the
# Megatron checkpoint's sharding and optimizer state).
RESUME_KEYS = ("policy.model_name", "policy.backend", "cipo.enabled", "policy.megatron.tensor_parallel",
               "policy.megatron.pipeline_parallel")


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


def resume_checkpoint(cfg: MasterConfig) -> Path | None:
    """The checkpoint this run starts from, checked against the config; None: start fresh.

    The run directory's own latest complete checkpoint comes first (a requeued run continues itself), else
    `checkpointing.resume_from` (a checkpoint directory, or a run directory: its latest)."""
    checkpointing = cfg.checkpointing
    if checkpointing.resume == "never":
        return None
    own = CheckpointManager(Path(cfg.run.output_dir) / CHECKPOINTS_DIR, keep_last=1).latest()
    checkpoint = own or (_checkpoint_at(Path(checkpointing.resume_from)) if checkpointing.resume_from else None)
    if checkpoint is not None and checkpointing.resume != "force":
        check_same_setup(checkpoint, cfg)
    return checkpoint


def _checkpoint_at(path: Path) -> Path:
    if (path / COMPLETE_MARKER).is_file():
        return path
    latest = CheckpointManager(path / CHECKPOINTS_DIR, keep_last=1).latest()
    if latest is None:
        raise ConfigError(f"checkpointing.resume_from: {path} is neither a complete checkpoint (step_N with "
                          f"{COMPLETE_MARKER}) nor a run directory holding one")
    return latest


def check_same_setup(checkpoint: Path, cfg: MasterConfig) -> None:
    """Raise ConfigError listing each RESUME_KEYS value that differs between the checkpoint's config and `cfg`."""
    saved_file = checkpoint / CONFIG_FILE
    try:
        saved = yaml.safe_load(saved_file.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{saved_file}: cannot read the checkpoint's config: {err}") from None
    current = cfg.model_dump(mode="json")
    differences = [f"  {key}: {_at(saved, key)!r} in the checkpoint, {_at(current, key)!r} now"
                   for key in RESUME_KEYS if _at(saved, key) != _at(current, key)]
    if differences:
        raise ConfigError("\n".join([
            f"checkpointing: {checkpoint} was saved with a different setup; start a new run (another run.output_dir) "
            "or resume anyway with checkpointing.resume=force:", *differences]))


def _at(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree
