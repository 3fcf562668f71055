"""The engine's weight reload runs inside vLLM's config context, as vLLM's own `Worker.reload_weights` runs it (issue
25, item 2): the refit extension (models/refit/vllm_worker.py) is mixed into vLLM's Worker and must call the worker's
method, not the model runner's, which the first load never runs outside `set_current_vllm_config`."""

import inspect
from types import SimpleNamespace

import torch
from vllm.v1.worker.gpu_worker import Worker

from cipo_nemo.models.refit.shm_file import write_refit_file
from cipo_nemo.models.refit.vllm_worker import VllmRefitWorkerExtension


class RecordingWorker(VllmRefitWorkerExtension):
    """vLLM's Worker as far as the reload goes: its `reload_weights` enters the config context (what the check
    below reads from vLLM's source), the model runner's records whether it was inside."""

    def __init__(self) -> None:
        self.inside_config = False
        self.calls: list[tuple[bool, list[str]]] = []
        model = torch.nn.Linear(2, 2)
        model.config = SimpleNamespace(tie_word_embeddings=False)
        self.model_runner = SimpleNamespace(
            get_model=lambda: model,
            model_config=SimpleNamespace(quantization=None),
            reload_weights=lambda weights_iterator: self.calls.append(
                (self.inside_config, [name for name, _ in weights_iterator])),
        )

    def reload_weights(self, *args, **kwargs) -> None:
        self.inside_config = True
        try:
            self.model_runner.reload_weights(*args, **kwargs)
        finally:
            self.inside_config = False


def test_vllm_worker_reload_enters_the_config_context():
    """The premise of the fake: vLLM 0.32's Worker.reload_weights wraps the runner's in set_current_vllm_config."""
    source = inspect.getsource(Worker.reload_weights)
    assert "with set_current_vllm_config(self.vllm_config):" in source
    assert "self.model_runner.reload_weights(" in source


def test_the_file_refit_reloads_through_the_workers_method(tmp_path):
    path = tmp_path / "weights.bin"
    write_refit_file(path, [("weight", torch.ones(2, 2)), ("bias", torch.zeros(2))])
    worker = RecordingWorker()
    assert worker.reload_weights_from_file(str(path), shortcut=False) == ["weight", "bias"]
    assert worker.calls == [(True, ["weight", "bias"])]
