"""The checkpoint export builds its TP1/PP1 model in host memory with megatron's local spec (issue 25, item 2),
also on a GPU node: a whole 70B model is 141 GB in bf16, more than one 80 GB GPU, and Transformer Engine may be
absent where the export runs. CUDA is made to look present here; what the build is asked for is recorded. (The real
export of a checkpoint whose config says transformer_engine: tests/functional/test_export.py.)"""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from cipo_nemo.config import load_config
from cipo_nemo.models.policy import checkpoint_export, megatron_setup

BASE = Path(__file__).resolve().parents[2] / "conf" / "cipo_base.yaml"
TE_POLICY = ["policy.backend=megatron", "policy.megatron.layer_spec=transformer_engine", "policy.megatron.fp8=e4m3",
             "policy.megatron.sequence_parallel=true", "policy.megatron.tensor_parallel=8",
             "policy.megatron.pipeline_parallel=4", "policy.megatron.activation_recompute=true"]


@pytest.fixture
def cuda_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_the_export_policy_is_one_process_on_the_local_spec():
    megatron = checkpoint_export.single_process_policy(load_config(BASE, TE_POLICY).policy).megatron
    assert (megatron.tensor_parallel, megatron.pipeline_parallel) == (1, 1)
    assert (megatron.layer_spec, megatron.fp8, megatron.sequence_parallel) == ("local", None, False)


def test_export_asks_for_a_host_build_of_the_local_spec(cuda_present, monkeypatch, tmp_path):
    asked = {}

    def record_build(**kwargs):
        asked.update(kwargs)
        raise RuntimeError("recorded")

    monkeypatch.setattr(megatron_setup, "init_parallel_state", lambda **kwargs: True)
    monkeypatch.setattr(megatron_setup, "build_megatron_model", record_build)
    with pytest.raises(RuntimeError, match="recorded"):
        checkpoint_export.export_megatron(load_config(BASE, TE_POLICY).policy, tmp_path, tmp_path / "out")
    assert asked["on_host"] is True and asked["for_training"] is False
    assert asked["policy_cfg"].megatron.layer_spec == "local"


def test_the_one_process_world_is_gloo_where_cuda_exists(cuda_present):
    with checkpoint_export.one_process_world():
        assert dist.get_backend() == "gloo"  # NCCL cannot carry host tensors
    assert not dist.is_initialized()


def test_a_host_build_keeps_the_weights_off_the_gpu(cuda_present):
    provider = SimpleNamespace()
    megatron_setup.apply_precision(provider, dtype=torch.bfloat16, on_host=True)
    assert provider.use_cpu_initialization is True
    megatron_setup.apply_precision(provider, dtype=torch.bfloat16)
    assert provider.use_cpu_initialization is False  # training on a GPU builds there, as before

    class RecordingProvider:
        def provide_distributed_model(self, **kwargs):
            self.kwargs = kwargs
            return []

    recording = RecordingProvider()
    megatron_setup._provide_ddp_model(recording, megatron_cfg=load_config(BASE, TE_POLICY).policy.megatron,
                                      dtype=torch.bfloat16, wrap_with_ddp=False, on_host=True)
    # megatron-bridge moves the model to the GPU unless this is set (models/model_provider.py:680-689)
    assert recording.kwargs["use_cpu_initialization"] is True
