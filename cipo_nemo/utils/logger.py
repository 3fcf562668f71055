"""Metrics sinks: JSONL always; TensorBoard, Weights & Biases and MLflow when configured.

One `MetricsLogger.log(step, metrics)` per step writes to every active sink. Values are python floats (or None
when a rate had nothing to measure, e.g. retention without a successful anchor): None is kept in the JSONL as
null and left out of the other sinks, which cannot store it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from cipo_nemo.config.schema import LoggerConfig

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    def __init__(self, *, logger_cfg: LoggerConfig, run_dir: Path, run_name: str, config: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.metrics_path = run_dir / METRICS_FILE
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = self.metrics_path.open("a", encoding="utf-8")
        self._tensorboard = _maybe_tensorboard(logger_cfg, run_dir)
        self._wandb = _maybe_wandb(logger_cfg, run_dir, run_name, config)
        self._mlflow = _maybe_mlflow(logger_cfg, run_name, config)

    def log(self, step: int, metrics: dict[str, float | None]) -> None:
        record = {"step": step, **{k: _json_safe(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        numeric = {k: v for k, v in metrics.items() if v is not None and math.isfinite(v)}
        if self._tensorboard is not None:
            for key, value in numeric.items():
                self._tensorboard.add_scalar(key, value, step)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)
        if self._mlflow is not None:
            self._mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in numeric.items()}, step=step)

    def close(self) -> None:
        self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._mlflow is not None:
            self._mlflow.end_run()


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


def _maybe_wandb(logger_cfg: LoggerConfig, run_dir: Path, run_name: str, config: dict[str, Any]) -> Any:
    if logger_cfg.wandb_project is None:
        return None
    try:
        import wandb
    except ImportError:
        raise RuntimeError("logger.wandb_project is set but wandb is not installed (pip install wandb)") from None
    return wandb.init(project=logger_cfg.wandb_project, name=run_name, dir=str(run_dir), config=config)


def _maybe_mlflow(logger_cfg: LoggerConfig, run_name: str, config: dict[str, Any]) -> Any:
    if logger_cfg.mlflow_tracking_uri is None:
        return None
    try:
        import mlflow
    except ImportError:
        raise RuntimeError("logger.mlflow_tracking_uri is set but mlflow is not installed (pip install mlflow)") from None
    mlflow.set_tracking_uri(logger_cfg.mlflow_tracking_uri)
    mlflow.start_run(run_name=run_name)
    mlflow.log_params({k: str(v) for k, v in _flatten(config).items()})
    return mlflow


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
