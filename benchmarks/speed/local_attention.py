"""Forward + backward tokens/s of megatron's local layer spec with its own core attention and with SDPACoreAttention,
against HF transformers + SDPA on the same weights, side by side in one run.

megatron-core's local spec (no Transformer Engine) computes attention unfused (DotProductAttention: scores
matrix, masked softmax, bmm); `policy.megatron.local_core_attention: sdpa` swaps in torch's fused
scaled_dot_product_attention (cipo_nemo/models/policy/sdpa_attention.py). Each variant runs in its own
subprocess (megatron's CPU compatibility mode, entered process-wide, would otherwise slow the HF side too):
build the model, one warm-up step, then `--steps` timed steps of forward to logits, next-token cross entropy,
backward; the best step counts. No optimizer step: this is the layers' speed, not the policy's.

Model: a random Qwen2-shaped model (GQA: heads = hidden / 64, KV heads = heads / 2), fp32 on CPU and bf16 on GPU.
`benchmarks/gpu_check.py` calls `measure_variants` for its `local_attention_tokens_per_s` check on a GPU.

Usage: python benchmarks/speed/local_attention.py [--hidden 256 --layers 4 --batch 4 --seq 512 --steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BASE_CONFIG = ROOT / "conf" / "cipo_base.yaml"
VARIANTS = ("hf_sdpa", "megatron_local", "megatron_local_sdpa")


def build_model_dir(path: Path, *, hidden: int, layers: int, seq: int) -> Path:
    from cipo_nemo.models.tiny import build_tiny_model_dir, build_tiny_tokenizer

    heads = max(1, hidden // 64)
    return build_tiny_model_dir(path, architecture="qwen2", hidden_size=hidden, num_layers=layers,
                                num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                                intermediate_size=4 * hidden, max_position_embeddings=max(2 * seq, 256),
                                tokenizer=build_tiny_tokenizer(vocab_size=2048))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    # mean over positions of -log softmax(logits[:, s])[input_ids[:, s + 1]]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


def timed_steps(step, steps: int) -> float:
    """Seconds of the fastest of `steps` calls of `step`, after one warm-up call."""
    step()
    seconds = []
    for _ in range(steps):
        _sync()
        started = time.perf_counter()
        step()
        _sync()
        seconds.append(time.perf_counter() - started)
    return min(seconds)


def hf_seconds(model_dir: Path, input_ids: torch.Tensor, *, dtype: torch.dtype, steps: int) -> float:
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(device)
    ids = input_ids.to(device)

    def step() -> None:
        _next_token_loss(model(input_ids=ids, use_cache=False).logits, ids).backward()
        model.zero_grad(set_to_none=True)

    seconds = timed_steps(step, steps)
    del model
    return seconds


def megatron_seconds(model_dir: Path, input_ids: torch.Tensor, *, core_attention: str, dtype: torch.dtype,
                     steps: int) -> float:
    """The policy's own model build (megatron-bridge, local spec, DDP wrap) in a one-rank world."""
    from cipo_nemo.config import load_config
    from cipo_nemo.models.policy.megatron_setup import build_megatron_model, init_parallel_state

    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    policy = load_config(BASE_CONFIG, [
        f"policy.model_name={model_dir}", f"policy.precision={precision}", "policy.megatron.layer_spec=local",
        f"policy.megatron.local_core_attention={core_attention}",
        f"policy.max_total_sequence_length={input_ids.shape[1]}",
    ]).policy
    init_parallel_state(megatron_cfg=policy.megatron, seed=0)
    model = build_megatron_model(policy_cfg=policy).chunks[0]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids = input_ids.to(device)
    positions = torch.arange(ids.shape[1], device=device).expand_as(ids)

    def step() -> None:
        logits = model(input_ids=ids, position_ids=positions, attention_mask=None)  # causal: no mask
        _next_token_loss(logits, ids).backward()
        model.zero_grad_buffer()

    seconds = timed_steps(step, steps)
    del model
    return seconds


def measure(variant: str, model_dir: Path, input_ids: torch.Tensor, *, dtype: torch.dtype, steps: int) -> float:
    """Tokens per second of one variant's forward + backward."""
    if variant == "hf_sdpa":
        seconds = hf_seconds(model_dir, input_ids, dtype=dtype, steps=steps)
    else:
        core = "sdpa" if variant == "megatron_local_sdpa" else "megatron"
        seconds = megatron_seconds(model_dir, input_ids, core_attention=core, dtype=dtype, steps=steps)
    return input_ids.numel() / seconds


def measure_variants(model_dir: Path, input_ids: torch.Tensor, *, dtype: torch.dtype, steps: int,
                     variants: tuple[str, ...] = VARIANTS) -> dict[str, float]:
    """Tokens/s per variant, each in a fresh subprocess (the ids travel through a file)."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ids_path = Path(tmp) / "ids.pt"
        torch.save(input_ids, ids_path)
        for variant in variants:
            env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "RANK": "0",
                   "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_PORT": os.environ.get("MASTER_PORT", "29541")}
            command = [sys.executable, __file__, "--child", variant, str(model_dir), str(ids_path),
                       "--dtype", "bf16" if dtype == torch.bfloat16 else "fp32", "--steps", str(steps)]
            finished = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            if finished.returncode != 0:
                raise RuntimeError(f"{variant} failed:\n{finished.stderr[-3000:]}")
            results[variant] = json.loads(finished.stdout.strip().splitlines()[-1])["tokens_per_s"]
    return results


def ratio_line(results: dict[str, float]) -> str:
    hf = results["hf_sdpa"]
    return (f"tokens/s: HF+SDPA {hf:,.0f}; Megatron local spec, megatron attention {results['megatron_local']:,.0f} "
            f"({results['megatron_local'] / hf:.2f}x HF); local spec + SDPACoreAttention "
            f"{results['megatron_local_sdpa']:,.0f} ({results['megatron_local_sdpa'] / hf:.2f}x HF, "
            f"{results['megatron_local_sdpa'] / results['megatron_local']:.2f}x megatron attention)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16" if torch.cuda.is_available() else "fp32")
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "MODEL_DIR", "IDS"))
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.child:
        variant, model_dir, ids_path = args.child
        tokens_per_s = measure(variant, Path(model_dir), torch.load(ids_path), dtype=dtype, steps=args.steps)
        print(json.dumps({"tokens_per_s": tokens_per_s}))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(Path(tmp) / "model", hidden=args.hidden, layers=args.layers, seq=args.seq)
        vocab = __import__("transformers").AutoConfig.from_pretrained(model_dir).vocab_size
        input_ids = torch.randint(4, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
        print(f"model hidden {args.hidden} x {args.layers} layers (GQA), {args.dtype}, batch {args.batch} x "
              f"{args.seq} tokens, fwd + bwd, best of {args.steps}; torch threads {torch.get_num_threads()}")
        print(ratio_line(measure_variants(model_dir, input_ids, dtype=dtype, steps=args.steps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
