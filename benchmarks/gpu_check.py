"""GPU check of the Megatron policy (not a CI test; CI has no GPU).

On one GPU: build a Qwen2-shaped model (random weights, HF directory written here), load it into Megatron-core
through megatron-bridge in bf16 (Transformer Engine layers when TE is importable, else the local spec), compare
its logprobs with Hugging Face transformers on the same weights (also with sequence packing: THD under TE),
run train steps through the real MegatronPolicyWorker, and print tokens/s for the forward+backward of a train step next to HF's, measured in the
same run. Without a GPU it runs the same path in fp32 on CPU at a tiny size (a smoke check of this script).

    python benchmarks/gpu_check.py [--hidden 1024 --layers 8 --batch 8 --seq 1024 --steps 3]

Record the output and the card in docs/notes/.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from cipo_nemo.algorithms.loss import PolicyLoss
from cipo_nemo.config import load_config
from cipo_nemo.data.batch import Batch
from cipo_nemo.models.tiny import build_tiny_model_dir, build_tiny_tokenizer

BASE = Path(__file__).resolve().parents[1] / "conf" / "cipo_base.yaml"
LOSS = PolicyLoss(clip_low=0.2, clip_high=0.2, normalization="token", kl_beta=0.0, kl_estimator="k3",
                  importance_sampling=False, is_truncation=2.0, loss_weight=1.0)


def parse_args() -> argparse.Namespace:
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024 if on_gpu else 128)
    parser.add_argument("--layers", type=int, default=8 if on_gpu else 2)
    parser.add_argument("--batch", type=int, default=8 if on_gpu else 4)
    parser.add_argument("--seq", type=int, default=1024 if on_gpu else 64)
    parser.add_argument("--steps", type=int, default=3)
    return parser.parse_args()


def random_batch(*, vocab_size: int, batch: int, seq: int) -> Batch:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, vocab_size, (batch, seq), generator=generator)
    prompt_mask = torch.zeros(batch, seq, dtype=torch.bool)
    prompt_mask[:, : seq // 4] = True
    return Batch({
        "input_ids": input_ids, "prompt_mask": prompt_mask, "response_mask": ~prompt_mask,
        "generation_logprobs": torch.zeros(batch, seq), "old_logprobs": torch.zeros(batch, seq),
        "advantages": torch.randn(batch, generator=generator), "group_id": torch.arange(batch) // 2,
        "sample_kind": ["base"] * batch,
    })


def hf_logprobs_and_speed(model_dir: Path, batch: Batch, dtype: torch.dtype, steps: int) -> tuple[torch.Tensor, float]:
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    ids = batch["input_ids"].to(device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    logprobs = torch.zeros(ids.shape, device=device)
    logprobs[:, 1:] = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    seconds = []
    for _ in range(steps):
        _sync()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        _sync()
        seconds.append(time.perf_counter() - start)
    return (logprobs * batch["response_mask"].to(device)).cpu(), ids.numel() / min(seconds)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> int:
    args = parse_args()
    on_gpu = torch.cuda.is_available()
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": os.environ.get("MASTER_PORT", "29533")})
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    tokenizer = build_tiny_tokenizer(vocab_size=2048)
    model_dir = build_tiny_model_dir(workdir / "model", architecture="qwen2", hidden_size=args.hidden,
                                     num_layers=args.layers, num_attention_heads=args.hidden // 64,
                                     num_key_value_heads=max(1, args.hidden // 256), intermediate_size=4 * args.hidden,
                                     max_position_embeddings=args.seq, tokenizer=tokenizer)
    precision = "bf16" if on_gpu else "fp32"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    policy = load_config(BASE, [f"policy.model_name={model_dir}", f"policy.precision={precision}",
                                f"policy.micro_batch_size={args.batch}", f"policy.logprob_micro_batch_size={args.batch}",
                                f"policy.max_total_sequence_length={args.seq}"]).policy
    batch = random_batch(vocab_size=len(tokenizer), batch=args.batch, seq=args.seq)
    hf_logprobs, hf_tokens_per_s = hf_logprobs_and_speed(model_dir, batch, dtype, args.steps)

    from cipo_nemo.models.policy.megatron_worker import MegatronPolicyWorker

    worker = MegatronPolicyWorker(policy=policy, num_steps=args.steps, seed=0)
    megatron_logprobs = worker.get_logprobs(batch)
    diff = (megatron_logprobs.float() - hf_logprobs).abs()[batch["response_mask"]].max().item()
    seconds = []
    for _ in range(args.steps):
        _sync()
        start = time.perf_counter()
        metrics = worker.train(batch, LOSS, global_denominator=float(batch.num_valid_tokens()))
        _sync()
        seconds.append(time.perf_counter() - start)
    megatron_tokens_per_s = batch["input_ids"].numel() / min(seconds)
    card = torch.cuda.get_device_name() if on_gpu else "CPU (smoke run)"
    print(f"device: {card}; precision {precision}; model hidden {args.hidden} x {args.layers} layers; "
          f"batch {args.batch} x {args.seq} tokens")
    print(f"layer spec: {policy.megatron.layer_spec} (resolved by the worker; TE importable: {_te_importable()})")
    print(f"logprobs Megatron vs HF: max abs diff {diff:.3e}")
    print(f"train step: loss {metrics['loss']:.5f}, grad norm {metrics['grad_norm']:.4f}")
    print(f"tokens/s (fwd+bwd+optimizer, best of {args.steps}): Megatron {megatron_tokens_per_s:,.0f}, "
          f"HF {hf_tokens_per_s:,.0f}, ratio Megatron/HF {megatron_tokens_per_s / hf_tokens_per_s:.2f}")
    worker.shutdown()
    # the same initial weights with sequence packing: THD rows with Transformer Engine, a block mask otherwise
    packed_worker = MegatronPolicyWorker(policy=policy.model_copy(update={"sequence_packing": True}),
                                         num_steps=args.steps, seed=0)
    packed_diff = (packed_worker.get_logprobs(batch).float() - hf_logprobs).abs()[batch["response_mask"]].max()
    print(f"packed logprobs Megatron vs HF: max abs diff {packed_diff.item():.3e}")
    packed_worker.shutdown()
    return 0


def _te_importable() -> bool:
    from cipo_nemo.models.policy.cpu_compat import transformer_engine_importable

    return transformer_engine_importable()


if __name__ == "__main__":
    sys.exit(main())
