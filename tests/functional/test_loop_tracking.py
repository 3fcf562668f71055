"""The real training loop (in-process HF backends, the tiny warm-started model) with W&B offline and MLflow on a
file store: a job stopped after step 1 and its resumed job log into ONE W&B run and ONE MLflow run, steps 1 and 2,
with a sample table per step, and the checkpoint names those runs."""

import json
import time
from pathlib import Path

import pytest

from cipo_nemo.config import load_config
from cipo_nemo.loop import train
from cipo_nemo.samples import read_samples
from cipo_nemo.trainer import setup, shutdown
from cipo_nemo.utils.tracking import TRACKING_FILE

pytestmark = pytest.mark.slow  # the training loop end to end

BASE = Path(__file__).resolve().parents[2] / "conf" / "cipo_base.yaml"


def _run(model, run_dir: Path, mlflow_uri: str, num_steps: int):
    overrides = [
        f"run.output_dir={run_dir}", f"grpo.num_steps={num_steps}", "grpo.prompts_per_step=2",
        "grpo.samples_per_prompt=4", "cipo.samples_per_anchor=2", "cipo.max_anchors_per_step=2",
        "cipo.attempt_max_tokens=32", "data.train.kind=file", f"data.train.file.path={model.train_file}",
        "verifier.num_workers=1", f"policy.model_name={model.model_dir}", "policy.backend=hf",
        "policy.precision=fp32", "policy.micro_batch_size=8", "policy.max_total_sequence_length=384",
        "generation.backend=hf", "generation.max_new_tokens=12", "checkpointing.save_every=1",
        "checkpointing.save_hf_at_end=false", "logger.tensorboard=false", "logger.plot=false",
        "logger.samples_every=1", "logger.wandb.project=cipo-loop", f"logger.mlflow.tracking_uri={mlflow_uri}",
        "logger.mlflow.experiment=cipo-loop",
    ]
    components = setup(load_config(BASE, overrides))
    try:
        return train(components)
    finally:
        shutdown(components)


def test_resumed_run_continues_the_tracked_runs(arithmetic_model, tmp_path, offline_wandb, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow_uri = (tmp_path / "mlruns").as_uri()
    run_dir = tmp_path / "run"
    _run(arithmetic_model, run_dir, mlflow_uri, num_steps=1)  # as if stopped after step 1's checkpoint
    ids = json.loads((run_dir / TRACKING_FILE).read_text())
    assert json.loads((run_dir / "checkpoints" / "step_000001" / TRACKING_FILE).read_text()) == ids
    time.sleep(1.02 - time.time() % 1)  # offline W&B folders are named by the second a job started
    summary = _run(arithmetic_model, run_dir, mlflow_uri, num_steps=2)
    assert summary.steps_done == 1
    assert json.loads((run_dir / TRACKING_FILE).read_text()) == ids

    # W&B: two jobs, one run id; step 1 in the first job's log, step 2 in the second's, a sample table at each
    runs = offline_wandb(run_dir)
    assert [run.run_id for run in runs] == [ids["wandb"]["run_id"]] * 2
    for step, run in zip((1, 2), runs):
        (record,) = run.history  # the table and the step's metrics merge into one history row per step
        assert record["_step"] == step and "reward/base_mean" in record and "train/loss" in record
        assert record["samples/nrows"] == len(read_samples(run_dir, step)[1])

    # MLflow: one run in the experiment holding both steps and both sample tables
    client = MlflowClient(tracking_uri=mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cipo-loop").experiment_id])
    assert run.info.run_id == ids["mlflow"]["run_id"] and run.info.status == "FINISHED"
    jsonl = {record["step"]: record["reward/base_mean"]
             for record in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    history = client.get_metric_history(run.info.run_id, "reward/base_mean")
    assert {metric.step: metric.value for metric in history} == jsonl and sorted(jsonl) == [1, 2]
    artifacts = [artifact.path for artifact in client.list_artifacts(run.info.run_id, "samples")]
    assert artifacts == ["samples/step_1.json", "samples/step_2.json"]
