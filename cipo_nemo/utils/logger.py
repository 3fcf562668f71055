"""Metrics sinks: JSONL always; TensorBoard, Weights & Biases and MLflow when configured.

One `MetricsLogger.log(step, metrics)` per step writes to every active sink. Values are python floats (or None
when a rate had nothing to measure, e.g. retention without a successful anchor): None is kept in the JSONL as
null and left out of the other sinks, which cannot store it. `log_samples` sends a step's sample dump to the
trackers as a table. The trackers and how their runs survive a requeue: cipo_nemo/utils/tracking.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from cipo_nemo.config.schema import LoggerConfig
from cipo_nemo.utils.tracking import open_trackers, sample_columns, write_tracking_ids

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    def __init__(self, *, logger_cfg: LoggerConfig, run_dir: Path, run_name: str, config: dict[str, Any],
                 continue_ids: dict[str, dict[str, str]] | None = None) -> None:
        """`continue_ids`: the tracked runs to continue (`tracking.ids_to_continue`); none: new runs."""
        self.run_dir = run_dir
        self.metrics_path = run_dir / METRICS_FILE
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = self.metrics_path.open("a", encoding="utf-8")
        self._tensorboard = _maybe_tensorboard(logger_cfg, run_dir)
        self._trackers = open_trackers(logger_cfg, run_dir=run_dir, run_name=run_name, config=config,
                                       continue_ids=continue_ids or {})

    def log(self, step: int, metrics: dict[str, float | None]) -> None:
        record = {"step": step, **{k: _json_safe(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        numeric = {k: v for k, v in metrics.items() if v is not None and math.isfinite(v)}
        if self._tensorboard is not None:
            for key, value in numeric.items():
                self._tensorboard.add_scalar(key, value, step)
            self._tensorboard.flush()
        for tracker in self._trackers:
            tracker.log(step, numeric)

    def log_samples(self, step: int, records: list[dict[str, Any]]) -> None:
        """A step's sample dump (cipo_nemo/samples.py records) as a table in each tracker."""
        if self._trackers and records:
            columns = sample_columns(records)
            for tracker in self._trackers:
                tracker.log_samples(step, columns)

    def tracking_ids(self) -> dict[str, dict[str, str]]:
        """Each tracker's run id and where it lives: what tracking.json holds."""
        return {tracker.name: tracker.identity() for tracker in self._trackers}

    def save_tracking_ids(self, directory: Path) -> None:
        """tracking.json into `directory` (a checkpoint), so that the checkpoint names the runs it continues."""
        if self._trackers:
            write_tracking_ids(directory, self.tracking_ids())

    def close(self) -> None:
        self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        for tracker in self._trackers:
            tracker.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The JSONL records of a run; a resumed run's repeated steps keep their latest record."""
    by_step: dict[int, dict[str, Any]] = {}
    with (run_dir / METRICS_FILE).open(encoding="utf-8") as stream:
        for line in stream:
            if line.strip():
                record = json.loads(line)
                by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def _json_safe(value: float | None) -> float | None:
    # JSON has no inf/nan; a non-finite metric is written as null rather than producing invalid JSON.
    if value is None or not math.isfinite(value):
        return None
    return value


def _maybe_tensorboard(logger_cfg: LoggerConfig, run_dir: Path) -> Any:
    if not logger_cfg.tensorboard:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))
