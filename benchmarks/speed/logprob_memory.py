"""Peak memory of the logprob (and train) pass: chunked logprobs against full-vocab fp32 logits, side by side.

The policies turn the last hidden states into token logprobs through the output projection and a log-softmax
(cipo_nemo/models/policy/chunked_logprobs.py). `policy.logprob_chunk_tokens: 0` is the naive way: fp32 logits over
the whole vocabulary for the whole micro-batch, plus the log-softmax of the same size. A positive value runs
projection and log-softmax over that many tokens at a time.

Model: a random Llama with SmolLM2-135M's vocabulary (49152) and hidden size (576), 2 layers, so that the
logits, not the layers, are what the pass holds. Batch: `--micro-batch` samples of `--length` tokens (the
exemplar's defaults, 4 x 1024), one micro-batch. For each backend (HF in-process; the Megatron worker in a
one-rank gloo world, local spec) and each chunk setting, a fresh subprocess builds the policy, warms up on two
short samples (a logprob pass and a train step, which allocates the optimizer's state), then measures
`get_logprobs`, then one `train` step.

How memory is measured: the kernel's peak resident set (VmHWM in /proc/self/status) is reset by writing 5 to
/proc/self/clear_refs right before a pass and read right after it; the peak minus the resident set at the reset
is what the pass added. glibc keeps freed small blocks in its heap, which would hide reuse, so the children run
with MALLOC_MMAP_THRESHOLD_=65536: every tensor over 64 KiB is its own mmap, returned to the kernel when freed,
and the resident set follows the live tensors. Each pass also reports its wall time.

Usage: python benchmarks/speed/logprob_memory.py [--chunk-tokens 1024] [--micro-batch 4] [--length 1024]
       [--backends hf,megatron]
Exit 1 when the chunked logprob pass is above 1/4 of the naive one's peak, or the logprobs differ.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

import torch  # noqa: E402

from benchmarks.common.batches import LOSS, variable_length_batch  # noqa: E402
from cipo_nemo.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BASE_CONFIG = ROOT / "conf" / "cipo_base.yaml"
VOCAB, HIDDEN = 49152, 576  # SmolLM2-135M's
GOAL = 0.25


def build_model_dir(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from cipo_nemo.models.tiny import build_tiny_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=1536, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)  # token ids below are drawn from the model's 49152
    return path


# ----- the measured child -------------------------------------------------------------------------------------


def _status_kib(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def peak_added_mib(call) -> tuple[float, float, object]:
    """(MiB the resident set peaked above its level at the start, seconds, result) of `call()`."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start_kib, started = _status_kib("VmRSS"), time.perf_counter()
    result = call()
    seconds = time.perf_counter() - started
    return (_status_kib("VmHWM") - start_kib) / 1024, seconds, result


def child(backend: str, model_dir: str, chunk_tokens: int, micro_batch: int, length: int) -> dict:
    policy_cfg = load_config(BASE_CONFIG, [
        f"policy.model_name={model_dir}", "policy.precision=fp32", f"policy.micro_batch_size={micro_batch}",
        f"policy.logprob_micro_batch_size={micro_batch}", f"policy.max_total_sequence_length={length}",
        f"policy.logprob_chunk_tokens={chunk_tokens}", "policy.megatron.layer_spec=local",
    ]).policy
    if backend == "hf":
        from cipo_nemo.models.policy.hf_policy import HFPolicy

        policy = HFPolicy(policy=policy_cfg, num_steps=10, seed=0)
    else:
        from cipo_nemo.models.policy.megatron_worker import MegatronPolicyWorker

        policy = MegatronPolicyWorker(policy=policy_cfg, num_steps=10, seed=0)
    warmup = variable_length_batch(vocab_size=VOCAB, lengths=[16] * 2)  # thread pools, lazy buffers and the optimizer's state: not part of the passes
    policy.get_logprobs(warmup)
    policy.train(warmup, LOSS, global_denominator=float(LOSS.local_denominator([warmup])))
    batch = variable_length_batch(vocab_size=VOCAB, lengths=[length] * micro_batch)
    logprob_mib, logprob_s, logprobs = peak_added_mib(lambda: policy.get_logprobs(batch))
    denominator = float(LOSS.local_denominator([batch]))
    train_mib, train_s, metrics = peak_added_mib(lambda: policy.train(batch, LOSS, global_denominator=denominator))
    return {"logprob_mib": logprob_mib, "logprob_s": logprob_s, "train_mib": train_mib, "train_s": train_s,
            "logprob_sum": float(logprobs.double().sum()), "loss": metrics["loss"],
            "grad_norm": metrics["grad_norm"]}


# ----- the parent: one subprocess per (backend, chunk setting) ------------------------------------------------


def run_child(backend: str, model_dir: Path, chunk_tokens: int, args: argparse.Namespace) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29531", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    command = [sys.executable, __file__, "--child", backend, str(model_dir), str(chunk_tokens),
               "--micro-batch", str(args.micro_batch), "--length", str(args.length)]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        raise RuntimeError(f"{backend} chunk {chunk_tokens} failed:\n{finished.stderr[-3000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunk-tokens", type=int, default=None, help="default: the exemplar's value")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--backends", default="hf,megatron")
    parser.add_argument("--child", nargs=3, metavar=("BACKEND", "MODEL_DIR", "CHUNK_TOKENS"))
    args = parser.parse_args()
    if args.child:
        backend, model_dir, chunk = args.child
        print(json.dumps(child(backend, model_dir, int(chunk), args.micro_batch, args.length)))
        return 0
    chunk_tokens = args.chunk_tokens or load_config(BASE_CONFIG, []).policy.logprob_chunk_tokens
    naive_logits_mib = args.micro_batch * args.length * VOCAB * 4 / 2**20
    print(f"vocab {VOCAB}, micro-batch {args.micro_batch} x {args.length} tokens, fp32: one full-vocab logits "
          f"tensor is {naive_logits_mib:.0f} MiB; chunks of {chunk_tokens} tokens; torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'backend':<9} {'pass':<8} {'naive MiB':>10} {'chunked MiB':>12} {'ratio':>6} "
          f"{'naive s':>8} {'chunked s':>10}")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(Path(tmp) / "model")
        for backend in args.backends.split(","):
            naive = run_child(backend, model_dir, 0, args)
            chunked = run_child(backend, model_dir, chunk_tokens, args)
            for stage in ("logprob", "train"):
                ratio = chunked[f"{stage}_mib"] / naive[f"{stage}_mib"]
                print(f"{backend:<9} {stage:<8} {naive[f'{stage}_mib']:>10.0f} {chunked[f'{stage}_mib']:>12.0f} "
                      f"{ratio:>6.3f} {naive[f'{stage}_s']:>8.2f} {chunked[f'{stage}_s']:>10.2f}")
            ok &= chunked["logprob_mib"] <= GOAL * naive["logprob_mib"]
            same = abs(chunked["logprob_sum"] - naive["logprob_sum"]) <= 1e-6 * abs(naive["logprob_sum"])
            same &= abs(chunked["loss"] - naive["loss"]) <= 1e-5 * abs(naive["loss"]) + 1e-7
            if not same:
                print(f"{backend}: chunked and naive results differ: {chunked} vs {naive}")
            ok &= same
    print(f"goal: chunked logprob pass <= {GOAL} x naive: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
