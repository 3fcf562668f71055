"""Experiment trackers for real: W&B in offline mode (its run logs read back) and MLflow on a local file store
(MLflow's own client reads it back). Run ids persist in the run directory and in checkpoints, a second job in the
same run directory appends to the same runs, sample dumps become tables, and the CLI stops with one line when a
configured tracker cannot start."""

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from cipo_nemo.__main__ import main
from cipo_nemo.config import load_config
from cipo_nemo.utils.checkpoint import CheckpointManager
from cipo_nemo.utils.logger import MetricsLogger
from cipo_nemo.utils.tracking import INSTALL_HINTS, TRACKING_FILE, ids_to_continue, sample_columns

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "conf" / "cipo_base.yaml"

# The shape of cipo_nemo/samples.py records: a base sample, and a correction with its nested anchor.
RECORDS = [
    {"step": 2, "index": 0, "kind": "base", "group_id": 0, "item_id": "sum-1", "answer": "3", "prompt": "1 + 2?",
     "response": "#### 4", "reward": 0.0, "verifier_reason": "wrong", "advantage": -1.0},
    {"step": 2, "index": 1, "kind": "correction", "group_id": 1, "item_id": "sum-1", "answer": "3",
     "prompt": "fix: #### 4", "response": "#### 3", "reward": 1.0, "verifier_reason": "correct", "advantage": 1.0,
     "shaped_reward": 1.0, "outcome": "fixed",
     "anchor": {"index": 0, "correct": False, "reward": 0.0, "verifier_reason": "wrong", "response": "#### 4"}},
]


def _cfg(run_dir: Path, *extra: str):
    return load_config(BASE, [f"run.output_dir={run_dir}", "logger.tensorboard=false", *extra])


def _job(cfg, steps: list[int], *, samples_at: int | None = None) -> None:
    """One job's logging, as the trainer does it: the tracked runs it continues come from ids_to_continue."""
    metrics = MetricsLogger(logger_cfg=cfg.logger, run_dir=Path(cfg.run.output_dir), run_name=cfg.run.name,
                            config=cfg.model_dump(mode="json"), continue_ids=ids_to_continue(cfg))
    try:
        for step in steps:
            if step == samples_at:
                metrics.log_samples(step, [{**record, "step": step} for record in RECORDS])
            metrics.log(step, {"reward/base_mean": step / 10, "val/pass@1": 0.5, "cipo/retention": None})
    finally:
        metrics.close()


def _tracking_ids(directory: Path) -> dict:
    return json.loads((directory / TRACKING_FILE).read_text())


def _next_second() -> None:
    # Offline W&B run folders are named by the second the job started; two jobs a test starts within one second
    # would share a folder (real requeues are minutes apart).
    time.sleep(1.02 - time.time() % 1)


def test_wandb_offline_requeued_job_continues_the_run(tmp_path, offline_wandb):
    run_dir = tmp_path / "run"
    cfg = _cfg(run_dir, "logger.wandb.project=cipo-test")
    _job(cfg, [1, 2], samples_at=2)
    run_id = _tracking_ids(run_dir)["wandb"]["run_id"]
    _next_second()
    _job(cfg, [3])  # requeued before any checkpoint: tracking.json alone names the run
    runs = offline_wandb(run_dir)
    assert [(run.run_id, run.project) for run in runs] == [(run_id, "cipo-test")] * 2
    assert [[record["_step"] for record in run.history] for run in runs] == [[1, 2], [3]]
    first = runs[0].history[0]
    assert first["reward/base_mean"] == 0.1 and first["val/pass@1"] == 0.5 and "cipo/retention" not in first
    (table,) = [record for record in runs[0].history if "samples/_type" in record]
    assert table["_step"] == 2 and table["samples/nrows"] == len(RECORDS)
    content = json.loads((runs[0].folder / "files" / table["samples/path"]).read_text())
    rows = [dict(zip(content["columns"], row)) for row in content["data"]]
    assert [row["response"] for row in rows] == ["#### 4", "#### 3"]
    assert rows[1]["anchor.response"] == "#### 4" and rows[0]["anchor.response"] is None


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses a file store without it
    return (tmp_path / "mlruns").as_uri()


def test_mlflow_requeued_job_appends_to_the_same_run(tmp_path, mlflow_store):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    options = (f"logger.mlflow.tracking_uri={mlflow_store}", "logger.mlflow.experiment=cipo-test")
    _job(_cfg(run_dir, *options, "grpo.num_steps=2"), [1, 2], samples_at=2)
    _job(_cfg(run_dir, *options, "grpo.num_steps=3"), [3], samples_at=3)  # longer: a changed param is kept as was
    client = MlflowClient(tracking_uri=mlflow_store)
    (run,) = client.search_runs([client.get_experiment_by_name("cipo-test").experiment_id])
    assert run.info.run_id == _tracking_ids(run_dir)["mlflow"]["run_id"]
    history = client.get_metric_history(run.info.run_id, "reward/base_mean")
    assert sorted((metric.step, metric.value) for metric in history) == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert "val/pass_at_1" in run.data.metrics and "cipo/retention" not in run.data.metrics
    assert run.info.status == "FINISHED" and run.data.params["grpo.num_steps"] == "2"
    artifacts = [artifact.path for artifact in client.list_artifacts(run.info.run_id, "samples")]
    assert artifacts == ["samples/step_2.json", "samples/step_3.json"]
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "samples/step_2.json", str(tmp_path))).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [(row["kind"], row["outcome"]) for row in rows] == [("base", None), ("correction", "fixed")]


def test_checkpoint_names_the_runs_when_the_run_directory_lost_them(tmp_path, mlflow_store):
    run_dir = tmp_path / "run"
    cfg = _cfg(run_dir, f"logger.mlflow.tracking_uri={mlflow_store}")
    metrics = MetricsLogger(logger_cfg=cfg.logger, run_dir=run_dir, run_name=cfg.run.name, config={},
                            continue_ids=ids_to_continue(cfg))
    checkpoint = CheckpointManager(run_dir / "checkpoints", keep_last=2).save(1, metrics.save_tracking_ids)
    metrics.close()
    ids = _tracking_ids(run_dir)
    assert _tracking_ids(checkpoint) == ids and ids["mlflow"]["run_id"]
    (run_dir / TRACKING_FILE).unlink()  # e.g. a run directory copied without it
    assert ids_to_continue(cfg) == ids
    # a fresh start in the same directory is a new tracked run
    fresh = _cfg(run_dir, f"logger.mlflow.tracking_uri={mlflow_store}", "checkpointing.resume=never")
    assert ids_to_continue(fresh) == {}
    _job(fresh, [1])
    assert _tracking_ids(run_dir)["mlflow"]["run_id"] != ids["mlflow"]["run_id"]


def test_a_run_directory_started_from_another_runs_checkpoint_is_a_new_tracked_run(tmp_path, mlflow_store):
    first = tmp_path / "first"
    _job(_cfg(first, f"logger.mlflow.tracking_uri={mlflow_store}"), [1])
    CheckpointManager(first / "checkpoints", keep_last=1).save(
        1, lambda directory: shutil.copy(first / TRACKING_FILE, directory))
    second = _cfg(tmp_path / "second", f"logger.mlflow.tracking_uri={mlflow_store}",
                  f"checkpointing.resume_from={first}")
    assert ids_to_continue(_cfg(first, f"logger.mlflow.tracking_uri={mlflow_store}"))  # its own run continues
    assert ids_to_continue(second) == {}  # another run directory: a new experiment from those weights


def test_another_experiment_starts_a_new_run(tmp_path, mlflow_store):
    run_dir = tmp_path / "run"
    _job(_cfg(run_dir, f"logger.mlflow.tracking_uri={mlflow_store}", "logger.mlflow.experiment=first"), [1])
    before = _tracking_ids(run_dir)["mlflow"]
    _job(_cfg(run_dir, f"logger.mlflow.tracking_uri={mlflow_store}", "logger.mlflow.experiment=second"), [2])
    after = _tracking_ids(run_dir)["mlflow"]
    assert after["run_id"] != before["run_id"] and after["experiment_id"] != before["experiment_id"]


def test_sample_columns_flatten_nested_fields_and_fill_gaps():
    columns = sample_columns(RECORDS)
    assert list(columns)[:3] == ["step", "index", "kind"]  # first-seen order: the base sample's fields first
    assert columns["anchor.correct"] == [None, False] and columns["outcome"] == [None, "fixed"]
    assert all(len(values) == len(RECORDS) for values in columns.values())


@pytest.mark.parametrize(("module", "option", "key"), [
    ("wandb", "logger.wandb.project=demo", "logger.wandb.project"),
    ("mlflow", "logger.mlflow.tracking_uri=http://127.0.0.1:5000", "logger.mlflow.tracking_uri"),
])
def test_cli_stops_with_one_line_when_a_tracker_is_not_installed(tmp_path, monkeypatch, capsys, module, option, key):
    monkeypatch.setitem(sys.modules, module, None)  # `import wandb` / `import mlflow` now raises ImportError
    code = main(["--config", str(BASE), "--dry-run", option, f"run.output_dir={tmp_path / 'run'}"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (f"install error: {key} is set but {module} is not installed: "
                                               f"{INSTALL_HINTS[module]} (or pip install 'cipo_nemo[tracking]')")
    assert not (tmp_path / "run").exists()


def test_cli_stops_on_a_file_store_mlflow_refuses(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = (tmp_path / "mlruns").as_uri()
    code = main(["--config", str(BASE), "--dry-run", f"logger.mlflow.tracking_uri={uri}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"config error: logger.mlflow.tracking_uri '{uri}': ")
    assert "MLFLOW_ALLOW_FILE_STORE=true" in lines[0]


def test_install_hints_name_the_tested_pins():
    pins = {line.split("==")[0]: line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#")}
    assert INSTALL_HINTS == {"wandb": f"pip install {pins['wandb']}", "mlflow": f"pip install {pins['mlflow-skinny']}"}
