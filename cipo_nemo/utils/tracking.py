"""Experiment trackers: Weights & Biases and MLflow through their own clients, one tracked run per run directory.

`logger.wandb.project` and `logger.mlflow.tracking_uri` switch them on. Each tracker's run id is written to
`<run_dir>/tracking.json` as soon as its run exists, before the first step, and each checkpoint carries a copy (the
same file name, next to the trainer state). A requeued or resumed job in the same run directory reads it back and
continues the same runs, `wandb.init(id=..., resume="allow")` and the MLflow run reopened by id, so the metrics after
a resume append to the run the first job started; a job killed before its first checkpoint continues its run too.
`checkpointing.resume: never` (a fresh start in the same directory) starts new tracked runs, and so does
`checkpointing.resume_from` into a new run directory (a new experiment that starts from another run's weights).

A step that ran after the last checkpoint runs again after a requeue: MLflow then holds both values at that step (in
its metric history, and rows appended to that step's sample table); W&B online keeps the first (it drops a step below
the run's last one). Offline W&B runs (WANDB_MODE=offline) are folders `wandb/offline-run-*-<id>` in the run
directory, one per job: `wandb sync` uploads them all into the one run.

Sample dumps (samples/step_<N>.jsonl) also go to a `wandb.Table` under the key `samples` at their step, and to the
MLflow artifact `samples/step_<N>.json` (`log_table`: the run's artifact view shows it as a table).
"""

from __future__ import annotations

import importlib
import json
import logging
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from cipo_nemo.config import ConfigError, MasterConfig
from cipo_nemo.config.schema import LoggerConfig, MlflowConfig, WandbConfig
from cipo_nemo.utils.checkpoint import CHECKPOINTS_DIR, CheckpointManager

logger = logging.getLogger(__name__)

TRACKING_FILE = "tracking.json"
SAMPLES_KEY = "samples"
# What `pip install` needs for each tracker; the pins are the tested ones (requirements.txt).
INSTALL_HINTS = {"wandb": "pip install wandb==0.29.0", "mlflow": "pip install mlflow-skinny==3.18.0"}


class TrackerNotInstalled(Exception):
    """A tracker is configured but its client package does not import."""


class Tracker(Protocol):
    name: str  # the key in tracking.json: "wandb" | "mlflow"

    def identity(self) -> dict[str, str]: ...  # the run id and where the run lives

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_samples(self, step: int, columns: dict[str, list[Any]]) -> None: ...

    def close(self) -> None: ...


# ----------------------------------------------------------------------------------------------- checks


def check_trackers(logger_cfg: LoggerConfig) -> None:
    """Before any worker starts: each configured tracker's client imports (TrackerNotInstalled, one line naming the
    key and the pip command), and an MLflow tracking URI opens as a store (ConfigError, e.g. MLflow 3's refusal of
    a file store without MLFLOW_ALLOW_FILE_STORE=true, or a database URI without sqlalchemy). Contacts no server."""
    if logger_cfg.wandb.project is not None:
        _import_client("wandb", "logger.wandb.project")
    if logger_cfg.mlflow.tracking_uri is not None:
        _import_client("mlflow", "logger.mlflow.tracking_uri")
        _mlflow_client(logger_cfg.mlflow.tracking_uri)


def _import_client(module: str, key: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TrackerNotInstalled(f"{key} is set but {module} is not installed: {INSTALL_HINTS[module]} "
                                  "(or pip install 'cipo_nemo[tracking]')") from None


def _mlflow_client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(tracking_uri=tracking_uri)  # builds the store: a URI it cannot serve fails here
    except Exception as err:  # MlflowException and the registry's own URI errors
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"logger.mlflow.tracking_uri {tracking_uri!r}: {first_line}") from None


# ----------------------------------------------------------------------------------------------- run ids


def ids_to_continue(cfg: MasterConfig) -> dict[str, dict[str, str]]:
    """The tracked runs this job continues: `<run_dir>/tracking.json` (written when the runs were created), else the
    copy in the run directory's latest checkpoint (a run directory moved without it); none on `resume: never`."""
    if cfg.checkpointing.resume == "never":
        return {}
    run_dir = Path(cfg.run.output_dir)
    checkpoint = CheckpointManager(run_dir / CHECKPOINTS_DIR, keep_last=1).latest()
    for directory in (run_dir, checkpoint):
        if directory is not None and (directory / TRACKING_FILE).is_file():
            return read_tracking_ids(directory)
    return {}


def read_tracking_ids(directory: Path) -> dict[str, dict[str, str]]:
    path = directory / TRACKING_FILE
    try:
        ids = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not JSON ({err.msg}); delete it to start new tracked runs") from None
    return ids


def write_tracking_ids(directory: Path, ids: dict[str, dict[str, str]]) -> None:
    """tracking.json, replaced whole (a reader never sees half a file)."""
    path = directory / TRACKING_FILE
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(ids, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    partial.replace(path)


def _same_destination(previous: dict[str, str] | None, current: dict[str, str]) -> str | None:
    """The previous run id when it lives where this config logs to (same project / store / experiment), else None."""
    if not previous or any(previous.get(key) != value for key, value in current.items()):
        return None
    return previous.get("run_id")


# ----------------------------------------------------------------------------------------------- opening


def open_trackers(logger_cfg: LoggerConfig, *, run_dir: Path, run_name: str, config: dict[str, Any],
                  continue_ids: dict[str, dict[str, str]]) -> list[Tracker]:
    """The configured trackers, each continuing its run in `continue_ids` when that run lives where the config logs
    to; `<run_dir>/tracking.json` names the runs in use once this returns."""
    check_trackers(logger_cfg)
    trackers: list[Tracker] = []
    ids: dict[str, dict[str, str]] = {}

    def opened(tracker: Tracker) -> None:  # persisted at once: a job killed before step 1 continues this run
        trackers.append(tracker)
        ids[tracker.name] = tracker.identity()
        write_tracking_ids(run_dir, ids)

    if logger_cfg.wandb.project is not None:
        opened(WandbTracker(logger_cfg.wandb, run_dir=run_dir, run_name=run_name, config=config,
                            previous=continue_ids.get(WandbTracker.name)))
    if logger_cfg.mlflow.tracking_uri is not None:
        opened(MlflowTracker(logger_cfg.mlflow, run_name=run_name, config=config,
                             previous=continue_ids.get(MlflowTracker.name)))
    return trackers


class WandbTracker:
    name = "wandb"

    def __init__(self, wandb_cfg: WandbConfig, *, run_dir: Path, run_name: str, config: dict[str, Any],
                 previous: dict[str, str] | None) -> None:
        import wandb

        self._where = {"project": wandb_cfg.project, **({"entity": wandb_cfg.entity} if wandb_cfg.entity else {})}
        run_id = _same_destination(previous, self._where)
        if previous and run_id is None:
            logger.warning("W&B: the run in %s logged to %s; this config logs to %s: starting a new run",
                           TRACKING_FILE, previous, self._where)
        # The id is chosen here, not by the server, so that tracking.json can name it before anything is logged.
        self.run_id = run_id or secrets.token_hex(6)  # W&B ids: unique per project, none of / \ # ? % :
        self._run = wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, id=self.run_id, resume="allow",
                               name=run_name, dir=str(run_dir), config=config)
        if run_id is not None:
            logger.info("W&B: continuing run %s", run_id)

    def identity(self) -> dict[str, str]:
        return {**self._where, "run_id": self.run_id}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log(metrics, step=step)

    def log_samples(self, step: int, columns: dict[str, list[Any]]) -> None:
        import wandb

        rows = [list(row) for row in zip(*columns.values())]
        self._run.log({SAMPLES_KEY: wandb.Table(columns=list(columns), data=rows)}, step=step)

    def close(self) -> None:
        self._run.finish()


class MlflowTracker:
    name = "mlflow"

    def __init__(self, mlflow_cfg: MlflowConfig, *, run_name: str, config: dict[str, Any],
                 previous: dict[str, str] | None) -> None:
        self._client = _mlflow_client(mlflow_cfg.tracking_uri)
        experiment = self._client.get_experiment_by_name(mlflow_cfg.experiment)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self._client.create_experiment(mlflow_cfg.experiment))
        self._where = {"tracking_uri": mlflow_cfg.tracking_uri, "experiment_id": experiment_id}
        self.run_id = self._reopen(_same_destination(previous, self._where))
        if self.run_id is None:
            if previous:
                logger.warning("MLflow: the run in %s (%s) is not in this store and experiment: starting a new run",
                               TRACKING_FILE, previous)
            self.run_id = self._client.create_run(experiment_id, run_name=run_name).info.run_id
        self._log_new_params(config)

    def _reopen(self, run_id: str | None) -> str | None:
        if run_id is None:
            return None
        from mlflow.exceptions import MlflowException

        try:
            self._client.get_run(run_id)
        except MlflowException:
            return None
        self._client.update_run(run_id, status="RUNNING")
        logger.info("MLflow: continuing run %s", run_id)
        return run_id

    def _log_new_params(self, config: dict[str, Any]) -> None:
        """The flattened config as params; MLflow never changes a logged param, so a resumed run adds only new keys
        and names the changed ones (the run directory's config.yaml holds the config in use)."""
        from mlflow.entities import Param

        logged = self._client.get_run(self.run_id).data.params
        params = {key: str(value) for key, value in flatten(config).items()}
        changed = sorted(key for key, value in params.items() if key in logged and logged[key] != value)
        if changed:
            logger.warning("MLflow: config changed since the run started (params keep the first value): %s",
                           ", ".join(changed))
        new = [Param(key, value) for key, value in params.items() if key not in logged]
        if new:
            self._client.log_batch(self.run_id, params=new)

    def identity(self) -> dict[str, str]:
        return {**self._where, "run_id": self.run_id}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        # MLflow metric names allow no '@' (pass@k)
        self._client.log_batch(self.run_id, metrics=[Metric(key.replace("@", "_at_"), value, now_ms, step)
                                                     for key, value in metrics.items()])

    def log_samples(self, step: int, columns: dict[str, list[Any]]) -> None:
        self._client.log_table(self.run_id, data=columns, artifact_file=f"{SAMPLES_KEY}/step_{step}.json")

    def close(self) -> None:
        self._client.set_terminated(self.run_id)


# ----------------------------------------------------------------------------------------------- tables


def sample_columns(records: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """Sample records (cipo_nemo/samples.py) as table columns: nested fields flattened to dotted names
    (anchor.response), the columns in first-seen order (the base stream's first), None where a record lacks one."""
    flat = [flatten(record) for record in records]
    names = list(dict.fromkeys(name for record in flat for name in record))
    return {name: [record.get(name) for record in flat] for name in names}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
