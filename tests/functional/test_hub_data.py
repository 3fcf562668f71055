"""Data by hub id end to end, on local data in hub format (tests/hub_layout.py: parquet shards and README configs in a
Hugging Face cache layout, offline): a training run on a `kind: hf` dataset that validates on a named benchmark,
and `cipo-nemo eval` on two named benchmarks in one command, which prints one table with their average and keeps
vLLM's and the tokenizer's lines off the console (they go to run.log), as training does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cipo_nemo.__main__ as entry
from cipo_nemo.eval.registry import REGISTRY
from tests.hub_layout import put_in_cache, write_dataset_repo

pytestmark = pytest.mark.slow  # a vLLM engine (eval) and the training loop

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "conf" / "cipo_base.yaml"
COMMIT = "f" * 40
SUMS = [(a, b) for a in range(5) for b in range(5)]  # what the warm-started tiny model answers as "#### n"


def question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


@pytest.fixture
def hub(offline_hub, tmp_path) -> Path:
    """MATH-500 and GSM8K in their hub schemas (sums the tiny model knows), and a training set by hub id, in the
    offline hub cache of this process (tests/conftest.py)."""
    cache = offline_hub
    math500 = [{"problem": question(a, b), "solution": f"$\\boxed{{{a + b}}}$", "answer": str(a + b),
                "subject": "Prealgebra", "level": 1, "unique_id": f"test/prealgebra/{i}.json"}
               for i, (a, b) in enumerate(SUMS[::5])]
    gsm8k = [{"question": question(a, b), "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}.\n#### {a + b}"}
             for a, b in SUMS[1::5]]
    put_in_cache(cache, REGISTRY["math500"].hub_id, COMMIT,
                 write_dataset_repo(tmp_path / "math500", {"default": {"test": math500}}), repo_type="dataset")
    put_in_cache(cache, REGISTRY["gsm8k"].hub_id, COMMIT, write_dataset_repo(tmp_path / "gsm8k", {
        "main": {"train": gsm8k, "test": gsm8k}, "socratic": {"train": gsm8k[:1], "test": gsm8k[:1]}}),
        repo_type="dataset")
    train = [{"question": question(a, b), "final": str(a + b)} for a, b in SUMS]
    put_in_cache(cache, "acme/sums", COMMIT, write_dataset_repo(tmp_path / "sums", {
        "default": {"train": train, "test": train[:3]}}, shards=2), repo_type="dataset")
    return cache


def test_training_takes_a_hub_dataset_and_validates_on_a_named_benchmark(arithmetic_model, hub, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = entry.main([
        "--config", str(BASE), f"run.output_dir={run_dir}", "grpo.num_steps=1", "grpo.prompts_per_step=2",
        "grpo.samples_per_prompt=2", "cipo.samples_per_anchor=2", "cipo.max_anchors_per_step=2",
        "cipo.attempt_max_tokens=32", "data.train.kind=hf", "data.train.hf.path=acme/sums",
        "data.train.hf.fields.prompt=question", "data.train.hf.fields.answer=final", "verifier.num_workers=1",
        f"policy.model_name={arithmetic_model.model_dir}", "policy.backend=hf", "policy.precision=fp32",
        "policy.max_total_sequence_length=384", "generation.backend=hf", "generation.max_new_tokens=12",
        "validation.every=1", "validation.benchmarks=[gsm8k]", "validation.samples_per_prompt=2",
        "validation.pass_k=[1,2]", "validation.max_items=3", "checkpointing.save_every=0",
        "checkpointing.save_hf_at_end=false", "logger.tensorboard=false", "logger.plot=false"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "acme/sums:train: 25 items" in out  # both shards of the train split
    snapshot = hub / "datasets--openai--gsm8k" / "snapshots" / COMMIT
    assert f"validation.benchmarks gsm8k openai/gsm8k: present in {snapshot}" in out
    assert "openai/gsm8k:main:test: 5 items" in out and "dropped: train 0, gsm8k 0" in out
    (record,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 1
    # one validation set: the average is that set's own number
    assert record["val/reward_mean"] == record["val/gsm8k/reward_mean"] is not None
    assert record["val/pass@2"] == record["val/gsm8k/pass@2"]


def test_eval_prints_one_table_for_two_named_benchmarks_with_a_clean_console(arithmetic_model, hub, tmp_path):
    output_dir = tmp_path / "eval"
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "dc"),
           "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "cipo_nemo.eval", "--model", str(arithmetic_model.model_dir),
               "--benchmarks", "math500,gsm8k", "--n", "4", "--k", "1,2,4", "--output-dir", str(output_dir),
               "--config", str(BASE), "generation.backend=vllm", "generation.max_new_tokens=12",
               "policy.max_total_sequence_length=512", "verifier.num_workers=1"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((output_dir / "results.json").read_text())
    table = done.stdout.splitlines()
    assert table[0].split() == ["benchmark", "problems", "n", "avg@4", "pass@1", "pass@2", "pass@4"]
    assert [line.split()[0] for line in table[2:4]] == ["math500", "gsm8k"]
    assert set(table[4]) == {"-"} and table[5].split()[0] == "average"
    math500, gsm8k = (results["benchmarks"][name]["metrics"] for name in ("math500", "gsm8k"))
    assert (math500["problems"], gsm8k["problems"]) == (5, 5)
    for k in ("1", "2", "4"):
        assert results["average"]["pass@k"][k] == pytest.approx((math500["pass@k"][k] + gsm8k["pass@k"][k]) / 2)
    assert table[5].split()[3:] == [f"{results['average'][key]:.3f}" if key == "avg" else
                                    f"{results['average']['pass@k'][key]:.3f}" for key in ("avg", "1", "2", "4")]
    assert 0 < results["average"]["avg"] < 1  # the tiny model gets some sums right, not all
    # the console: nothing from vLLM, the tokenizer or Python warnings; all of it in run.log
    noise = [line for line in done.stderr.splitlines() if line.strip() and " cipo_nemo." not in line]
    assert noise == [], noise[:10]
    log = (output_dir / "run.log").read_text()
    assert " vllm" in log and " INFO " in log
