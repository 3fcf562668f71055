"""Atomic checkpoints: written into a temporary directory and renamed when complete.

A crash mid-save leaves only a `.tmp-*` directory, which is never taken for a checkpoint and is cleaned up by the
next save; the last good checkpoint is untouched. A directory counts as a checkpoint only when it is named
`step_NNNNNN` and holds the COMPLETE marker, written last before the rename. `keep_last` complete checkpoints are
kept; older ones are deleted after a new one is in place.

Best checkpoint (`checkpointing.keep_best`, a validation metric such as `val/pass@1`): a checkpoint saved with that
metric in hand stores it in its own `metrics.json` (inside the atomic directory), and the best of them (highest, or
lowest with `keep_best_mode: min`; the earlier one on a tie) is kept besides the last `keep_last`. Since the best
is never pruned, the best over every checkpoint the run ever saved is always among the directories on disk, so it
is recomputed from them after each save (a resumed run continues the same choice) and written to
`checkpoints/best.json` (step, value, directory) for people and tools. A checkpoint saved without the metric (the
last step or an on-demand/early-stop save between validations) is not a candidate.

Which checkpoint a run starts from (`resume_checkpoint`): its own latest, else `checkpointing.resume_from`; one saved
with another model, `cipo.enabled` or policy layout stops the run with the differing keys unless
`checkpointing.resume: force`.
"""

from __future__ import annotations

import json
import math
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
POLICY_DIR = "policy"  # the policy backend's own checkpoint (dist_checkpointing for Megatron, policy.pt for HF)
TRAINER_STATE = "trainer_state.pt"
METRICS_FILE = "metrics.json"  # the step's validation metrics, when the step validated
BEST_FILE = "best.json"
# What a checkpoint cannot silently change: the weights' model, the algorithm, and the policy's layout (the
# Megatron checkpoint's sharding and optimizer state).
RESUME_KEYS = ("policy.model_name", "policy.backend", "cipo.enabled", "policy.megatron.tensor_parallel",
               "policy.megatron.pipeline_parallel")


class CheckpointManager:
    def __init__(self, root: Path, *, keep_last: int, keep_best: str | None = None,
                 keep_best_mode: str = "max") -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if keep_best_mode not in ("max", "min"):
            raise ValueError(f"keep_best_mode must be max|min, got {keep_best_mode!r}")
        self.root = root
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.keep_best_mode = keep_best_mode

    def save(self, step: int, write: Callable[[Path], None], *, metrics: dict[str, Any] | None = None) -> Path:
        """Call `write(tmp_dir)` to fill a fresh directory, then publish it as step_NNNNNN atomically.

        `metrics`: the step's metrics; its validation ones (`val/...`) are stored with the checkpoint, and they
        rank it for `keep_best`."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()
        final = self.root / f"step_{step:06d}"
        tmp = self.root / f".tmp-step_{step:06d}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        write(tmp)
        validation = {key: value for key, value in (metrics or {}).items() if key.startswith("val/") and value is not None}
        if validation:
            (tmp / METRICS_FILE).write_text(json.dumps({"step": step, "metrics": validation}, indent=1) + "\n")
        (tmp / COMPLETE_MARKER).write_text(f"{step}\n")
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. on demand right after a periodic save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        best = self.best()
        self._prune(keep=best[1] if best else None)
        self._write_best_file(best)
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

    def best(self) -> tuple[int, Path, float] | None:
        """(step, path, value) of the best complete checkpoint by `keep_best`; None without keep_best or when no
        checkpoint has the metric. The earlier checkpoint wins a tie."""
        if self.keep_best is None:
            return None
        best = None
        for step, path in self.complete_checkpoints():
            value = _stored_metric(path, self.keep_best)
            if value is not None and (best is None or self._better(value, best[2])):
                best = (step, path, value)
        return best

    def _better(self, value: float, than: float) -> bool:
        return value > than if self.keep_best_mode == "max" else value < than

    def _prune(self, *, keep: Path | None) -> None:
        for _, path in self.complete_checkpoints()[: -self.keep_last]:
            if path != keep:
                shutil.rmtree(path)

    def _write_best_file(self, best: tuple[int, Path, float] | None) -> None:
        """checkpoints/best.json, replaced atomically; removed when no checkpoint has the metric."""
        target = self.root / BEST_FILE
        if best is None:
            target.unlink(missing_ok=True)
            return
        step, path, value = best
        record = {"metric": self.keep_best, "mode": self.keep_best_mode, "step": step, "value": value,
                  "checkpoint": path.name}
        partial = self.root / f".{BEST_FILE}.{uuid.uuid4().hex[:8]}"
        partial.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(partial, target)

    def _remove_stale_temporaries(self) -> None:
        for path in self.root.glob(".tmp-step_*"):
            shutil.rmtree(path, ignore_errors=True)


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint a tool can read (export, eval), in one line; None when it is."""
    if not path.is_dir():
        return f"{path} is not a directory" if path.exists() else f"{path} does not exist"
    if not (path / COMPLETE_MARKER).is_file():
        if (path / CHECKPOINTS_DIR).is_dir():
            return f"{path} is a run directory; pass one of its checkpoints, e.g. {path / CHECKPOINTS_DIR}/step_N"
        if path.parent.name == CHECKPOINTS_DIR or _STEP_DIR.match(path.name) or path.name.startswith(".tmp-step_"):
            return f"{path} is an incomplete checkpoint (no {COMPLETE_MARKER} marker: its save did not finish)"
        return f"{path} is not a training checkpoint (a run's {CHECKPOINTS_DIR}/step_N directory)"
    for required in (CONFIG_FILE, POLICY_DIR):
        if not (path / required).exists():
            return f"{path} is a checkpoint without {required}; it cannot be read"
    return None


def _stored_metric(checkpoint: Path, key: str) -> float | None:
    """The checkpoint's stored validation metric `key`; None when it has none (or an unreadable/NaN one)."""
    try:
        value = json.loads((checkpoint / METRICS_FILE).read_text())["metrics"].get(key)
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    if not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)


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
