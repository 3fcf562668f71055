"""The vLLM worker's shared-memory busy-wait is capped on CPU engines (vllm_spin.py), and only there."""

from __future__ import annotations

import uuid

import pytest
import zmq
from vllm.distributed.device_communicators import shm_broadcast

from cipo_nemo.config.schema import VllmConfig
from cipo_nemo.models.generation.vllm_generation import build_engine_environment
from cipo_nemo.models.generation.vllm_spin import CPU_SPIN_S, SPIN_ENV, limit_spin_from_environment


@pytest.fixture
def spin_condition(monkeypatch: pytest.MonkeyPatch):
    """vLLM's SpinCondition, restored after the test; yields a factory of reader instances."""
    monkeypatch.setattr(shm_broadcast.SpinCondition, "__init__", shm_broadcast.SpinCondition.__init__)
    context = zmq.Context()
    readers = []

    def new_reader() -> shm_broadcast.SpinCondition:
        reader = shm_broadcast.SpinCondition(is_reader=True, context=context,
                                             notify_address=f"ipc:///tmp/cipo_spin_test_{uuid.uuid4().hex}")
        readers.append(reader)
        return reader

    yield new_reader
    for reader in readers:
        for socket in (reader.local_notify_socket, reader.read_cancel_socket, reader.write_cancel_socket):
            socket.close(linger=0)
    context.term()


def test_spin_is_capped_only_when_the_environment_says_so(spin_condition, monkeypatch) -> None:
    monkeypatch.delenv(SPIN_ENV, raising=False)
    assert limit_spin_from_environment() is None
    assert spin_condition().busy_loop_s == 1  # vLLM's own second

    monkeypatch.setenv(SPIN_ENV, "0.05")
    assert limit_spin_from_environment() == 0.05
    assert spin_condition().busy_loop_s == 0.05
    monkeypatch.setenv(SPIN_ENV, "0")  # a second cap replaces the first (no wrapper around a wrapper)
    limit_spin_from_environment()
    assert spin_condition().busy_loop_s == 0
    assert not hasattr(shm_broadcast.SpinCondition.__init__.__wrapped__, "__wrapped__")


def test_a_bad_spin_value_names_the_variable(spin_condition, monkeypatch) -> None:
    for value in ("fast", "-1"):
        monkeypatch.setenv(SPIN_ENV, value)
        with pytest.raises(ValueError, match=SPIN_ENV):
            limit_spin_from_environment()


def test_cpu_engines_get_the_cap_gpu_engines_do_not() -> None:
    vllm = VllmConfig(tensor_parallel=1, gpu_memory_utilization=0.5, cpu_kv_cache_gib=1, dtype="auto",
                      quantization=None, enforce_eager=True, max_num_batched_tokens=None)
    assert build_engine_environment(vllm=vllm, on_gpu=False)[SPIN_ENV] == str(CPU_SPIN_S)
    assert SPIN_ENV not in build_engine_environment(vllm=vllm, on_gpu=True)
