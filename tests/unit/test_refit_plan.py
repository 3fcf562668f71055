"""The dry run's refit figures (issues 16 and 25): per transport what moves, the buffers it holds and its time at
stated rates (each with its source), the refit as a memory phase with the chosen transport's buckets, and the
/dev/shm and host-memory checks of the file transport."""

from dataclasses import replace
from pathlib import Path

import pytest

from cipo_nemo.config import load_config
from cipo_nemo.models.refit.cost import GIB, RATES, check_refit_host, hf_tensor_sizes
from cipo_nemo.models.refit.layout import plan_buckets
from cipo_nemo.models.shapes import find_model_shape
from cipo_nemo.plan import plan_launch

CONF = Path(__file__).resolve().parents[2] / "conf"
LLAMA3_70B_PARAMS = 70_553_706_496  # 80 x 856.7M per layer + 2 x 128256 x 8192 (untied) + final norm
GB = 1e9


def plan_of(preset: str, *overrides: str):
    cfg = load_config(CONF / preset, list(overrides))
    return plan_launch(cfg, base_samples=1024, max_correction_samples=1024)


def plan_70b(*overrides: str):
    return plan_of("cipo_llama3_70b_math.yaml", *overrides)


def test_70b_fp8_on_8_nodes_refits_by_ipc_within_the_goal_and_every_stage_is_its_bytes_over_its_rate():
    refit = plan_of("cipo_llama3_70b_math_fp8.yaml").refit
    model = LLAMA3_70B_PARAMS * 2  # bf16, the policy's export
    assert refit.file_bytes == model and refit.chosen == "ipc"
    rate = {name: r.value for name, r in RATES.items()}
    shape, _ = find_model_shape("meta-llama/Llama-3.3-70B-Instruct")
    messages = len(plan_buckets(hf_tensor_sizes(shape, 2), 2**30))
    gather = {"gather TP": model / 4 * 3 / 4 / GB / rate["nvlink"],  # TP 4: 3/4 of each stage's shards
              "gather PP (infiniband)": model * 3 / 4 / GB / rate["infiniband"]}  # PP 4 stages of 2 nodes each
    ipc = refit.transports["ipc"]
    expected = gather | {"pack": model / GB / rate["device_copy"], "handshakes": messages * rate["per_bucket"],
                         "engine load": model / 8 / GB / rate["device_copy"], "engine layers": 80 * rate["per_layer"]}
    assert {stage: seconds for stage, (seconds, _) in ipc.stages.items()} == pytest.approx(expected)
    assert ipc.device_buffer_bytes == 2 * 2**30 and ipc.host_bytes == 0
    assert ipc.seconds == pytest.approx(3.9, abs=0.05) and ipc.seconds <= 15  # the goal; ~86 s by /dev/shm before
    file = refit.transports["file"]
    assert file.seconds == pytest.approx(sum(gather.values()) + 14.11 + 70.55 + 1.76, abs=0.01)  # today's path
    broadcast = refit.transports["broadcast"]
    assert broadcast.stages["broadcast (infiniband)"][0] == pytest.approx(model / GB / rate["infiniband"])


def test_qwen3_4b_on_one_node_refits_within_two_seconds():
    refit = plan_of("cipo_qwen3_4b_math.yaml").refit
    assert refit.chosen == "ipc" and refit.seconds <= 2
    assert not any(stage.startswith("gather") for stage in refit.transports["ipc"].stages)  # TP 1, PP 1: no gather


def test_the_dry_run_says_per_transport_what_moves_and_each_rates_source():
    lines = plan_of("cipo_llama3_70b_math_fp8.yaml").lines()
    text = "\n".join(lines)
    assert next(line for line in lines if line.startswith("refit per step:")).startswith(
        "refit per step: 131.4 GiB of HF weights by ipc, ~3.9 s")
    assert "ipc (chosen): every GPU's policy rank packs the gathered model into 1 GiB buckets" in text
    assert "nothing touches the host; 2.0 GiB of buckets per GPU" in text
    assert "file: the first rank of each of 8 node(s)" in text and "131.4 GiB of host memory per writing node" in text
    for name, rate in RATES.items():
        assert f"rate {name} {rate.value:g} " in text and rate.source in text
    assert "NVIDIA-NeMo/RL pull request 2413" in text  # the published cross-check


def test_refit_is_a_memory_phase_of_its_own():
    embedding = 128256 * 8192 * 2 / GIB
    by_file = plan_70b("refit.transport=file").memory
    # file: the export (the engine asleep, one full embedding) or the reload (the engine's weights instead)
    export = by_file.policy_state + by_file.overhead + by_file.vllm_asleep + embedding
    reload = by_file.policy_state + by_file.overhead + by_file.vllm_asleep + by_file.vllm_weights
    assert by_file.refit == pytest.approx(max(export, reload))
    # ipc (auto on colocated GPUs): the engine's weights are awake while the policy gathers into two 1 GiB buckets
    by_ipc = plan_70b().memory
    assert by_ipc.refit == pytest.approx(reload + embedding + 2.0)
    # generation no longer carries the policy's activations: they are released (empty_cache) after train
    assert by_ipc.generation == pytest.approx(by_ipc.policy_state + by_ipc.overhead + by_ipc.vllm_share)
    tight = plan_70b("cluster.gpu_memory_gib=60", "generation.vllm.gpu_memory_utilization=0.2").memory
    assert tight.peak_phase == "refit" and tight.peak == pytest.approx(tight.refit)


def test_small_shared_memory_or_host_memory_is_reported_where_the_workers_run():
    refit = replace(plan_70b("refit.transport=file").refit, checked_here=True, shm_free_bytes=64 * 2**20,
                    host_total_bytes=2**40)
    (problem,) = check_refit_host(refit)
    assert "does not fit /dev/shm on this machine (0.06 GiB free)" in problem and "131.4 GiB" in problem
    assert check_refit_host(replace(refit, shm_free_bytes=2**40, host_total_bytes=200 * GIB)) == []  # holds it once
    (problem,) = check_refit_host(replace(refit, shm_free_bytes=2**40, host_total_bytes=100 * GIB))
    assert "host memory (100.0 GiB) is smaller than the refit's file on a writing node (131.4 GiB" in problem
    assert check_refit_host(replace(refit, shm_free_bytes=2**40)) == []
    assert check_refit_host(replace(refit, checked_here=False)) == []  # a login node without GPUs: not its memory
    assert check_refit_host(replace(refit, chosen="ipc")) == []  # buckets need neither /dev/shm nor host memory


def test_a_bucket_transport_asked_for_on_cpu_is_planned_beside_the_file():
    refit = plan_70b("cluster.gpu_memory_gib=null", "cluster.gpu_arch=null", "refit.transport=broadcast").refit
    assert refit.chosen == "broadcast" and list(refit.transports) == ["broadcast", "file"]
    assert any("no GPU: the rates are a GPU's" in line for line in plan_70b(
        "cluster.gpu_memory_gib=null", "cluster.gpu_arch=null", "refit.transport=broadcast").lines())
