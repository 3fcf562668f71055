"""`refit.*` (issue 25): the transport follows the placement unless the config names one, and a transport that
cannot reach the engines is refused with one line naming the key, before anything starts."""

from pathlib import Path

import pytest

from cipo_nemo.config import ConfigError, load_config
from cipo_nemo.models.refit.layout import resolve_transport

CONF = Path(__file__).resolve().parents[2] / "conf"


def refit_cfg(*overrides: str):
    return load_config(CONF / "cipo_base.yaml", list(overrides)).refit


def test_auto_keeps_the_file_on_cpu_and_streams_buckets_on_gpus():
    auto = refit_cfg()
    assert (auto.transport, auto.bucket_mb) == ("auto", 1024)
    assert resolve_transport(auto, on_gpu=False, colocated=True) == "file"
    assert resolve_transport(auto, on_gpu=True, colocated=True) == "ipc"
    assert resolve_transport(auto, on_gpu=True, colocated=False) == "broadcast"
    assert resolve_transport(auto, on_gpu=True, colocated=True, vllm=False) == "file"  # HF generate: no engine
    assert resolve_transport(refit_cfg("refit.transport=ipc"), on_gpu=False, colocated=True) == "ipc"


@pytest.mark.parametrize("overrides, message", [
    (["refit.transport=ipc", "generation.backend=hf"],
     "command line: refit: transport 'ipc' streams into vLLM engines, but generation.backend is 'hf'"),
    (["refit.transport=ipc", "generation.colocated=false", "cluster.generation_devices_per_node=1"],
     "command line: refit: transport 'ipc' hands each engine worker the policy's buffers on the same device"),
    (["refit.transport=ipc", "policy.backend=hf", "cluster.devices_per_node=2"],
     "command line: refit: transport 'ipc' with policy.backend hf: the HF policy is one process"),
    (["refit.transport=broadcast"],  # the exemplar is a colocated GPU layout
     "command line: refit: transport 'broadcast' with engines colocated on GPUs: NCCL cannot join two processes"),
    (["refit.bucket_mb=0"], "command line: refit.bucket_mb: Input should be greater than or equal to 1"),
])
def test_a_transport_that_cannot_reach_the_engines_is_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(CONF / "cipo_base.yaml", overrides)


def test_broadcast_over_gloo_is_allowed_without_gpus():
    assert refit_cfg("refit.transport=broadcast", "cluster.gpu_memory_gib=null", "cluster.gpu_arch=null").transport \
        == "broadcast"
