import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from worker_guard import WorkerGuard

# Tests never reach a model or dataset hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The `slow` marker (pyproject.toml) is kept honest: a test without it fails when it starts a real worker
# (tests/worker_guard.py says what counts and how it is seen).
WORKER_GUARD = WorkerGuard()


def pytest_configure(config: pytest.Config) -> None:
    WORKER_GUARD.install()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    watched = item.get_closest_marker("slow") is None
    if watched:
        WORKER_GUARD.watch(item.nodeid)
    try:
        yield
    finally:
        if watched:
            WORKER_GUARD.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = (yield).get_result()
    if item.get_closest_marker("slow") is not None:
        return
    started = WORKER_GUARD.take()
    if not started:
        return
    message = (f"{item.nodeid} is not marked slow, but during its {report.when} it {'; '.join(started)}. Mark the "
               "test, or its module (pytestmark), with @pytest.mark.slow: `pytest -m \"not slow\"` is the fast loop.")
    if report.failed:
        report.sections.append(("worker guard", message))
    else:
        report.outcome, report.longrepr = "failed", message


@dataclass(frozen=True)
class OfflineWandbRun:
    """One job's offline W&B run folder (`<dir>/wandb/offline-run-<time>-<id>`), read back from its .wandb log."""

    folder: Path
    run_id: str
    project: str
    history: list[dict]  # one dict per logged step: '_step', the metrics, 'samples/...' for a table


def read_offline_wandb_runs(root: Path) -> list[OfflineWandbRun]:
    """Every offline run under `root/wandb`, oldest first: W&B's own record reader on the transaction log that
    `wandb sync` uploads (the history is nowhere else offline)."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    runs = []
    for folder in sorted((root / "wandb").glob("offline-run-*")):
        (log,) = folder.glob("run-*.wandb")
        store = datastore.DataStore()
        store.open_for_scan(str(log))
        run_id, project, history = "", "", []
        while (data := store.scan_data()) is not None:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id, project = record.run.run_id, record.run.project
            elif kind == "history":
                history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.history.item})
        runs.append(OfflineWandbRun(folder=folder, run_id=run_id, project=project, history=history))
    return runs


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B in offline mode with its config and cache folders in tmp; yields the reader of offline runs."""
    for name, folder in (("WANDB_CONFIG_DIR", "wandb_config"), ("WANDB_CACHE_DIR", "wandb_cache"),
                         ("WANDB_DATA_DIR", "wandb_data")):
        (tmp_path / folder).mkdir()
        monkeypatch.setenv(name, str(tmp_path / folder))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return read_offline_wandb_runs


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face hub cache in tmp_path, offline (HF_HUB_OFFLINE=1, as every test is), and the datasets
    library's Arrow cache beside it: tests/hub_layout.py puts models and datasets into it."""
    import datasets
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")
    return cache
