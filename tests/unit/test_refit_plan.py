"""The dry run's refit figures (issue 16, items 7 and 8): the device transient of a refit as a memory phase, the
file each node writes per step, its host transient and time, and the /dev/shm and host-memory checks."""

from dataclasses import replace
from pathlib import Path

import pytest

from cipo_nemo.config import load_config
from cipo_nemo.models.refit.cost import GIB, check_refit_host
from cipo_nemo.plan import plan_launch

CONF = Path(__file__).resolve().parents[2] / "conf"
LLAMA3_70B_PARAMS = 70_553_706_496  # 80 x 856.7M per layer + 2 x 128256 x 8192 (untied) + final norm


def plan_70b(*overrides: str):
    cfg = load_config(CONF / "cipo_llama3_70b_math.yaml", list(overrides))
    return plan_launch(cfg, base_samples=1024, max_correction_samples=1024)


def test_refit_at_70b_writes_the_bf16_model_once_per_node_and_says_what_it_costs():
    plan = plan_70b()
    refit = plan.refit
    assert refit.file_bytes == LLAMA3_70B_PARAMS * 2 and refit.writers == 8
    # the file in tmpfs only: the writer streams each gathered tensor into it (no second host copy of the model)
    assert refit.host_transient_bytes == refit.file_bytes
    # ~141 GB: device->host at 10 GB/s, write at 2 GB/s, each of the 8 engine ranks loads its 1/8 at 10 GB/s
    assert refit.seconds == pytest.approx({"device->host": 14.11, "write": 70.55, "engine reload": 1.76},
                                          abs=0.01)
    line = next(line for line in plan.lines() if line.startswith("refit per step:"))
    assert "131.4 GiB of HF weights gathered by 8 rank(s)" in line and "~86.4 s" in line


def test_refit_is_a_memory_phase_of_its_own():
    memory = plan_70b().memory
    # export: policy state + overhead + the asleep engine + one full embedding (128256 x 8192 bf16 = 1.96 GiB);
    # reload: the engine's weights instead of that tensor
    export = memory.policy_state + memory.overhead + memory.vllm_asleep + 128256 * 8192 * 2 / GIB
    reload = memory.policy_state + memory.overhead + memory.vllm_asleep + memory.vllm_weights
    assert memory.refit == pytest.approx(max(export, reload))
    # generation no longer carries the policy's activations: they are released (empty_cache) after train
    assert memory.generation == pytest.approx(memory.policy_state + memory.overhead + memory.vllm_share)
    tight = plan_70b("cluster.gpu_memory_gib=60", "generation.vllm.gpu_memory_utilization=0.2").memory
    assert tight.peak_phase == "refit" and tight.peak == pytest.approx(tight.refit)


def test_small_shared_memory_or_host_memory_is_reported_where_the_workers_run():
    refit = replace(plan_70b().refit, checked_here=True, shm_free_bytes=64 * 2**20, host_total_bytes=2**40)
    (problem,) = check_refit_host(refit)
    assert "does not fit /dev/shm on this machine (0.06 GiB free)" in problem and "131.4 GiB" in problem
    assert check_refit_host(replace(refit, shm_free_bytes=2**40, host_total_bytes=200 * GIB)) == []  # holds it once
    (problem,) = check_refit_host(replace(refit, shm_free_bytes=2**40, host_total_bytes=100 * GIB))
    assert "host memory (100.0 GiB) is smaller than the refit's file on a writing node (131.4 GiB" in problem
    assert check_refit_host(replace(refit, shm_free_bytes=2**40)) == []
    assert check_refit_host(replace(refit, checked_here=False)) == []  # a login node without GPUs: not its memory
