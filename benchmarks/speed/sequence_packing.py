"""Sequence packing against right-padded micro-batches, measured side by side in one run.

An RL batch has a long tail of response lengths: most rows of a right-padded micro-batch are padding. This
builds a small random Llama (hidden 256, 4 layers) and a batch of `--samples` sequences (prompts of 20-60
tokens, responses of 8-`--max-response` tokens, log-uniform so that a few are long), then times, for each
policy backend (HF in-process and the Megatron worker in a one-rank gloo world), `get_logprobs` and one
`train` step with `policy.sequence_packing` false and true, alternating, `--repeats` times each. It prints
the median seconds, the packed/unpacked ratio, the share of computed positions that are padding, and checks
that both layouts give the same loss (else exit 1).

Usage: python benchmarks/speed/sequence_packing.py [--samples 32] [--max-response 448] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

import torch  # noqa: E402

from benchmarks.common.batches import LOSS, synthetic_batch  # noqa: E402
from cipo_nemo.config import load_config  # noqa: E402
from cipo_nemo.data.batch import Batch  # noqa: E402
from cipo_nemo.data.packing import plan_packed_rows, sequence_lengths  # noqa: E402
from cipo_nemo.models.tiny import build_tiny_model_dir  # noqa: E402

BASE_CONFIG = Path(__file__).resolve().parents[2] / "conf" / "cipo_base.yaml"
MICRO_BATCH_SIZE = 4


def make_batch(*, samples: int, max_response: int, vocab_size: int, seed: int = 0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    prompt_lengths = torch.randint(20, 61, (samples,), generator=generator)
    # log-uniform response lengths: many short, a few long (the tail padding is paid for)
    log_lengths = torch.rand(samples, generator=generator) * (math.log(max_response) - math.log(8)) + math.log(8)
    response_lengths = log_lengths.exp().round().long()
    return synthetic_batch(prompt_lengths.tolist(), response_lengths.tolist(), vocab_size=vocab_size,
                           generator=generator, group_size=4)


def policy_config(model_dir: Path, *, packing: bool, max_length: int):
    return load_config(BASE_CONFIG, [
        f"policy.model_name={model_dir}", "policy.precision=fp32", f"policy.micro_batch_size={MICRO_BATCH_SIZE}",
        f"policy.logprob_micro_batch_size={MICRO_BATCH_SIZE}", f"policy.max_total_sequence_length={max_length}",
        f"policy.sequence_packing={str(packing).lower()}", "policy.megatron.layer_spec=local",
    ]).policy


def build_policy(backend: str, model_dir: Path, *, packing: bool, max_length: int):
    config = policy_config(model_dir, packing=packing, max_length=max_length)
    if backend == "hf":
        from cipo_nemo.models.policy.hf_policy import HFPolicy

        return HFPolicy(policy=config, num_steps=100, seed=0)
    from cipo_nemo.models.policy.megatron_worker import MegatronPolicyWorker

    return MegatronPolicyWorker(policy=config, num_steps=100, seed=0)


def timed(call) -> tuple[float, object]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def measure(backend: str, model_dir: Path, batch: Batch, *, repeats: int, max_length: int) -> dict[bool, dict]:
    policies = {packing: build_policy(backend, model_dir, packing=packing, max_length=max_length)
                for packing in (False, True)}
    denominator = float(LOSS.local_denominator([batch]))
    results: dict[bool, dict] = {packing: {"logprobs": [], "train": [], "loss": []} for packing in policies}
    for _ in range(repeats):
        for packing, policy in policies.items():  # alternate, so that load changes hit both alike
            seconds, _ = timed(lambda: policy.get_logprobs(batch))
            results[packing]["logprobs"].append(seconds)
            seconds, metrics = timed(lambda: policy.train(batch, LOSS, global_denominator=denominator))
            results[packing]["train"].append(seconds)
            results[packing]["loss"].append(metrics["loss"])
    for policy in policies.values():
        if hasattr(policy, "shutdown") and backend == "megatron":
            policy.shutdown()
    return results


def padding_shares(batch: Batch, max_length: int) -> tuple[float, float]:
    """Share of computed positions that are padding: right-padded micro-batches vs packed rows."""
    lengths = sequence_lengths(batch)
    real = sum(lengths)
    padded = sum(MICRO_BATCH_SIZE * max(lengths[i : i + MICRO_BATCH_SIZE])
                 for i in range(0, len(lengths), MICRO_BATCH_SIZE))
    packed_rows = plan_packed_rows(lengths, MICRO_BATCH_SIZE * max_length)
    return 1 - real / padded, 1 - real / sum(row.num_tokens for row in packed_rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--max-response", type=int, default=448)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="hf,megatron")
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model_dir(Path(tmp) / "model", hidden_size=256, num_layers=4, num_attention_heads=4,
                                         num_key_value_heads=4, intermediate_size=704, max_position_embeddings=1024)
        vocab_size = len(__import__("transformers").AutoTokenizer.from_pretrained(model_dir))
        batch = make_batch(samples=args.samples, max_response=args.max_response, vocab_size=vocab_size)
        max_length = batch["input_ids"].shape[1]
        padded_share, packed_share = padding_shares(batch, max_length)
        print(f"batch: {args.samples} samples, {batch.num_valid_tokens()} response tokens, longest {max_length}; "
              f"padding share of computed positions: right-padded {padded_share:.0%}, packed {packed_share:.0%}; "
              f"torch threads {torch.get_num_threads()}")
        print(f"{'backend':<9} {'stage':<9} {'unpacked s':>11} {'packed s':>9} {'packed/unpacked':>16}")
        consistent = True
        for backend in args.backends.split(","):
            results = measure(backend, model_dir, batch, repeats=args.repeats, max_length=max_length)
            for stage in ("logprobs", "train"):
                plain, packed = (statistics.median(results[p][stage]) for p in (False, True))
                print(f"{backend:<9} {stage:<9} {plain:>11.3f} {packed:>9.3f} {packed / plain:>16.2f}")
            first_losses = results[False]["loss"][0], results[True]["loss"][0]
            if not math.isclose(*first_losses, rel_tol=1e-4):
                print(f"{backend}: packed and unpacked first-step losses differ: {first_losses}")
                consistent = False
    return 0 if consistent else 1


if __name__ == "__main__":
    sys.exit(main())
