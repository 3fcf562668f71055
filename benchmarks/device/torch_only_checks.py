"""The GPU checks that need torch and transformers only: what the machine this project is sometimes lent has (one
H100 or H200, CUDA torch 2.11, Python 3.12, transformers 5.17; no vLLM, Transformer Engine or megatron-core, no
network). benchmarks/gpu_check.py runs them after its own checks, into the same report:

  ipc_bucket_transfer           the refit's ipc transport (cipo_nemo/models/refit/ipc.py) between two processes on one
                                GPU: the policy side packs 1, 2, 4 and 8 GiB of bf16 tensors into 1 GiB buckets (one
                                tensor larger than a bucket goes alone), the engine side maps them by CUDA IPC and
                                copies every view into its own weights. GB/s per size; the bytes arrive intact
                                (checksums); no host copy: neither process's resident set grows, the sender's CUDA
                                allocator holds the two buckets and nothing more, and the device's used memory grows by
                                the engine's weights and those buckets only (cudaMemGetInfo).
  hf_policy_bf16_vs_cpu         (config: pydantic, omegaconf) the HF policy backend in bf16 on the GPU against the same
                                backend in fp32 on the CPU (a child process without CUDA): the logprob pass
                                (token_mult_prob_error), one train step (loss, grad norm) and where it moves the
                                logprobs.
  chunked_logprobs_peak_memory  (GPU) the logprob projection of cipo_nemo/models/policy/chunked_logprobs.py over a
                                151936-token vocabulary, 8192 tokens: peak CUDA memory of the forward (logprob pass)
                                and forward + backward, chunked (1024 tokens) against unchunked; the same values.
  nccl_transport                (GPU) which network NCCL found (InfiniBand or sockets), from NCCL's own INIT log of a
                                one-rank group, and whether libibverbs loads.

Without a GPU (the CPU smoke run, CI) the same code runs at small sizes: the IPC transfer through shared memory (the
resident-set check does not apply: CPU buckets are host memory; /proc/self/maps measures them instead), the HF
policy in the CPU's bf16 (or fp32) against fp32; the two GPU-only checks say SKIPPED and why.
"""

from __future__ import annotations

import ctypes.util
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

import torch  # noqa: E402

from benchmarks.common.batches import LOSS  # noqa: E402
from cipo_nemo.models.policy.chunked_logprobs import chunked_token_logprobs, full_vocab_logprobs  # noqa: E402
from cipo_nemo.models.refit.ipc import IpcChannel, IpcReceiver, send_over_ipc  # noqa: E402
from cipo_nemo.models.refit.layout import SLOTS  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
GIB, MIB = 2**30, 2**20
RSS_SLACK = 256 * MIB  # allocator and library noise in a resident set: far below one GiB of weights
DEVICE_SLACK = 128 * MIB  # the CUDA caching allocator rounds blocks
MULT_ERROR_BF16 = 1.05
MULT_ERROR_FP32 = 1.001
CHUNK_GOAL = 0.25  # chunked peak at most a quarter of the unchunked one (benchmarks/speed/logprob_memory.py's goal)


def _on_gpu() -> bool:
    return torch.cuda.is_available()


def resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# ----------------------------------------------------------------------------------------------- IPC transfer


def transfer_sizes() -> tuple[list[int], int]:
    """(total bytes per run, bucket bytes): 1-8 GiB in 1 GiB buckets on a GPU, 16-48 MiB in 8 MiB on CPU."""
    if _on_gpu():
        return [n * GIB for n in (1, 2, 4, 8)], GIB
    return [16 * MIB, 48 * MIB], 8 * MIB


def make_weights(total: int, bucket: int, device: torch.device, seed: int) -> list[tuple[str, torch.Tensor]]:
    """bf16 tensors of an eighth of a bucket, and first one of 1.25 buckets (sent alone), `total` bytes in all."""
    generator = torch.Generator(device=device).manual_seed(seed)
    sizes = [bucket + bucket // 4] if total >= 2 * bucket else []
    while sum(sizes) < total:
        sizes.append(min(bucket // 8, total - sum(sizes)))
    return [(f"w{index}", torch.rand(size // 2, generator=generator, device=device, dtype=torch.float32)
             .to(torch.bfloat16)) for index, size in enumerate(sizes)]


def byte_checksum(tensors: list[torch.Tensor]) -> int:
    return sum(int(t.reshape(-1).view(torch.uint8).sum(dtype=torch.int64)) for t in tensors)


def _load_bucket(bucket: list[tuple[str, torch.Tensor]], weights: torch.Tensor, offset: int) -> int:
    """The engine's load: copy each view into its own weights (in a function, so no view outlives it)."""
    for _, view in bucket:
        nbytes = view.numel() * view.element_size()
        weights[offset: offset + nbytes].copy_(view.reshape(-1).view(torch.uint8))
        offset += nbytes
    return offset


def engine_side(jobs: list[tuple[dict, int]], results) -> None:
    """The receiving process: for each (channel, total bytes), map the buckets and copy them into its weights."""
    device = torch.device("cuda", 0) if _on_gpu() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.init()
    for channel, total in jobs:
        try:
            weights = torch.empty(total, dtype=torch.uint8, device=device)
            weights.fill_(0)  # allocated and touched before the baselines
            rss_before = resident_bytes()
            used_before = _device_used(device)
            receiver = IpcReceiver(IpcChannel(**channel), sender_rank=0)
            offset, first = 0, None
            for bucket in receiver.buckets():
                first = first or time.perf_counter()
                offset = _load_bucket(bucket, weights, offset)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - first
            used_delta = _device_used(device) - used_before  # the sender's buckets are alive until finish()
            stats = receiver.finish()
            results.put({"seconds": seconds, "checksum": int(weights.sum(dtype=torch.int64)), "bytes": offset,
                         "device_used_delta": used_delta, "rss_delta": resident_bytes() - rss_before,
                         "stats": stats})
        except Exception as exc:  # noqa: BLE001 - reported by the sending side
            results.put({"error": f"{type(exc).__name__}: {exc}"})
        finally:
            weights = None


def _device_used(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(device)
    return total - free


def ipc_bucket_transfer() -> Callable:
    def check() -> tuple[bool, str, dict]:
        device = torch.device("cuda", 0) if _on_gpu() else torch.device("cpu")
        sizes, bucket = transfer_sizes()
        channels = [IpcChannel.create(bucket_bytes=bucket, timeout_s=120) for _ in sizes]
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        engine = context.Process(target=engine_side, args=([(asdict(c), n) for c, n in zip(channels, sizes)], results))
        engine.start()
        rows, problems = [], []
        try:
            for index, (channel, total) in enumerate(zip(channels, sizes)):
                row = _send_one(channel, total, bucket, device, seed=index, results=results)
                rows.append(row)
                problems += row.pop("problems")
        finally:
            engine.join(timeout=120)
            if engine.is_alive():
                engine.kill()
        line = "; ".join(f"{_size(row['bytes'])} {row['gb_per_s']:.1f} GB/s" for row in rows)
        detail = (f"{line} ({'CUDA IPC, one GPU' if device.type == 'cuda' else 'shared memory, CPU smoke'}; "
                  f"{bucket / MIB:g} MiB buckets, {SLOTS} slots)")
        return not problems, detail + ("; " + "; ".join(problems) if problems else ""), {"runs": rows}

    return check


def _send_one(channel: IpcChannel, total: int, bucket: int, device: torch.device, *, seed: int, results) -> dict:
    weights = make_weights(total, bucket, device, seed)
    expected = byte_checksum([t for _, t in weights])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    allocated_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    rss_before = resident_bytes()
    sent = send_over_ipc(iter(weights), channel, sender_rank=0)
    engine = results.get(timeout=300)
    if "error" in engine:
        raise RuntimeError(f"engine side: {engine['error']}")
    largest_alone = max((t.numel() * 2 for _, t in weights if t.numel() * 2 > bucket), default=0)
    row = {"bytes": total, "gb_per_s": total / 1e9 / engine["seconds"], "engine_seconds": engine["seconds"],
           "sender": sent["sender"], "engine": engine["stats"], "rss_delta_sender": resident_bytes() - rss_before,
           "rss_delta_engine": engine["rss_delta"], "device_used_delta": engine["device_used_delta"], "problems": []}
    if engine["checksum"] != expected or engine["bytes"] != total:
        row["problems"].append(f"{_size(total)}: the engine's bytes differ from the policy's")
    buffers = SLOTS * bucket
    if device.type == "cuda":
        row["sender_allocator_peak"] = torch.cuda.max_memory_allocated(device) - allocated_before
        if row["sender_allocator_peak"] > buffers + DEVICE_SLACK:  # the large tensor is shared, never copied
            row["problems"].append(f"sender allocated {row['sender_allocator_peak'] / GIB:.2f} GiB (buckets: "
                                   f"{buffers / GIB:g})")
        if not total <= engine["device_used_delta"] <= total + buffers + DEVICE_SLACK:
            row["problems"].append(f"device memory grew by {engine['device_used_delta'] / GIB:.2f} GiB for "
                                   f"{total / GIB:g} GiB of weights and {buffers / GIB:g} GiB of buckets")
        for side in ("sender", "engine"):
            if row[f"rss_delta_{side}"] > RSS_SLACK:
                row["problems"].append(f"{side}'s resident set grew by {row[f'rss_delta_{side}'] / MIB:.0f} MiB: a "
                                       "host copy")
    elif engine["stats"]["peak_measured_bytes"] > buffers + _pages(largest_alone):
        row["problems"].append(f"the engine mapped {engine['stats']['peak_measured_bytes'] / MIB:.1f} MiB "
                               f"(buckets {buffers / MIB:g} MiB + alone {largest_alone / MIB:.1f} MiB)")
    del weights
    return row


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:g} GiB" if nbytes >= GIB else f"{nbytes / MIB:g} MiB"


def _pages(nbytes: int) -> int:
    return -(-nbytes // 4096) * 4096


# ----------------------------------------------------------------------------------------------- HF policy


def config_importable() -> str | None:
    """None when the config stack imports, else why not (the HF policy takes its settings from it)."""
    try:
        import omegaconf  # noqa: F401
        import pydantic  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} not importable (carry its wheel: docs/notes/gpu_check.md)"
    return None


def hf_policy_config(model_dir: Path, *, precision: str, batch: int, seq: int):
    from cipo_nemo.config import load_config

    return load_config(REPO / "conf" / "cipo_base.yaml", [
        f"policy.model_name={model_dir}", f"policy.precision={precision}", "policy.cpu_bf16=true",
        f"policy.micro_batch_size={batch}", f"policy.logprob_micro_batch_size={batch}",
        f"policy.max_total_sequence_length={seq}", "policy.reference_policy=none", "policy.optimizer.lr=1e-3",
        "policy.optimizer.min_lr=1e-3",
    ]).policy


def hf_policy_pass(model_dir: Path, batch_file: Path, *, precision: str) -> dict:
    """The HF policy's logprob pass, one train step, and the logprob pass again; and the dtype it computed in."""
    from cipo_nemo.models.policy.hf_policy import HFPolicy
    from cipo_nemo.models.policy.megatron_setup import resolve_param_dtype

    batch = torch.load(batch_file, weights_only=False)
    config = hf_policy_config(model_dir, precision=precision, batch=len(batch), seq=batch["input_ids"].shape[1])
    policy = HFPolicy(policy=config, num_steps=2, seed=0)
    before = policy.get_logprobs(batch)
    metrics = policy.train(batch, LOSS)
    after = policy.get_logprobs(batch)
    policy.shutdown()
    return {"before": before, "after": after, "loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
            "dtype": str(resolve_param_dtype(config)).removeprefix("torch.")}


def hf_policy_bf16_vs_cpu(model_dir: Path, batch) -> Callable:
    def check() -> tuple[bool, str, dict]:
        work = Path(tempfile.mkdtemp(prefix="gpu_check_hf_"))
        torch.save(batch, work / "batch.pt")
        environment = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        run = subprocess.run([sys.executable, __file__, "--hf-reference", str(model_dir), str(work)],
                             env=environment, capture_output=True, text=True, timeout=600)
        if run.returncode != 0:
            raise RuntimeError(f"CPU reference failed: {run.stderr.strip().splitlines()[-1:]}")
        reference = torch.load(work / "reference.pt", weights_only=False)
        ours = hf_policy_pass(model_dir, work / "batch.pt", precision="bf16")
        mask = batch["response_mask"]
        error = (ours["before"] - reference["before"]).abs()[mask].exp().mean().item()
        moved_ours, moved_reference = (ours["after"] - ours["before"])[mask], (reference["after"] - reference["before"])[mask]
        agreement = torch.nn.functional.cosine_similarity(moved_ours, moved_reference, dim=0).item()
        bound = MULT_ERROR_BF16 if ours["dtype"] == "bfloat16" else MULT_ERROR_FP32
        values = {"token_mult_prob_error": error, "bound": bound, "dtype": ours["dtype"], "loss": ours["loss"],
                  "reference_loss": reference["loss"], "grad_norm": ours["grad_norm"],
                  "reference_grad_norm": reference["grad_norm"], "step_direction_cosine": agreement,
                  "device": "cuda" if _on_gpu() else "cpu"}
        grad_close = math.isclose(ours["grad_norm"], reference["grad_norm"], rel_tol=0.1)
        passed = error < bound and grad_close and agreement > 0.8 and math.isfinite(ours["loss"])
        return passed, (f"{ours['dtype']} on {values['device']} vs fp32 on CPU: logprob pass token_mult_prob_error "
                        f"{error:.5f} (bound {bound}); train step loss {ours['loss']:.5f} vs {reference['loss']:.5f}, "
                        f"grad norm {ours['grad_norm']:.4f} vs {reference['grad_norm']:.4f} (10%); logprob change "
                        f"cosine {agreement:.3f} (> 0.8)"), values

    return check


# ----------------------------------------------------------------------------------------------- chunked logprobs


def chunked_logprobs_peak_memory(*, vocab: int = 151936, hidden: int = 2560, tokens: int = 8192,
                                 chunk: int = 1024) -> Callable:
    def check() -> tuple[bool, str, dict]:
        device = torch.device("cuda", 0)
        generator = torch.Generator(device=device).manual_seed(0)
        weight = (torch.randn(vocab, hidden, generator=generator, device=device) * 0.02).to(torch.bfloat16)
        states = torch.randn(tokens, 1, hidden, generator=generator, device=device).to(torch.bfloat16)
        targets = torch.randint(0, vocab, (tokens, 1), generator=generator, device=device)
        peaks, values = {}, {}
        for name, chunk_tokens in (("unchunked", 0), ("chunked", chunk)):
            for grad in (False, True):
                head = weight.clone().requires_grad_(grad)
                hidden_states = states.clone().requires_grad_(grad)
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                start = torch.cuda.memory_allocated(device)
                with torch.set_grad_enabled(grad):
                    logprobs = chunked_token_logprobs(hidden_states, targets, project=lambda h, w=head: h @ w.t(),
                                                      token_logprobs=full_vocab_logprobs, chunk_tokens=chunk_tokens,
                                                      dim=0)
                    if grad:
                        logprobs.sum().backward()
                torch.cuda.synchronize(device)
                pass_name = "train" if grad else "logprob"
                peaks[f"{name}_{pass_name}"] = torch.cuda.max_memory_allocated(device) - start
                values[f"{name}_{pass_name}"] = logprobs.detach().float().cpu()
                del head, hidden_states, logprobs
        ratios = {p: peaks[f"chunked_{p}"] / peaks[f"unchunked_{p}"] for p in ("logprob", "train")}
        diff = max((values[f"chunked_{p}"] - values[f"unchunked_{p}"]).abs().max().item() for p in ("logprob", "train"))
        passed = max(ratios.values()) <= CHUNK_GOAL and diff < 0.05  # bf16 logits: kernels differ by chunk size
        detail = ", ".join(f"{p} pass {peaks[f'chunked_{p}'] / GIB:.2f} GiB chunked vs {peaks[f'unchunked_{p}'] / GIB:.2f} "
                           f"unchunked ({ratios[p]:.2f}x)" for p in ("logprob", "train"))
        return passed, f"{detail}; goal <= {CHUNK_GOAL}x; max |diff| {diff:.1e}", \
            {"peak_bytes": peaks, "ratios": ratios, "max_abs_diff": diff, "vocab": vocab, "tokens": tokens}

    return check


# ----------------------------------------------------------------------------------------------- NCCL


NCCL_PROBE = """
import torch, torch.distributed as dist
dist.init_process_group("nccl", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
tensor = torch.ones(1, device="cuda")
dist.all_reduce(tensor)
torch.cuda.synchronize()
dist.destroy_process_group()
"""


def nccl_transport(port: int = 29577) -> Callable:
    def check() -> tuple[bool, str, dict]:
        environment = {**os.environ, "NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT,NET"}
        run = subprocess.run([sys.executable, "-c", NCCL_PROBE.format(port=port)], env=environment,
                             capture_output=True, text=True, timeout=120)
        log = run.stdout + run.stderr
        network = re.findall(r"Using network (\w+)", log)
        ib = re.findall(r"NET/IB ?: (.*)", log)
        socket_devices = re.findall(r"NET/Socket ?: Using (.*)", log)
        verbs = ctypes.util.find_library("ibverbs")
        values = {"network": network[:1], "ib": ib[:3], "socket": socket_devices[:3], "libibverbs": verbs,
                  "returncode": run.returncode}
        if run.returncode != 0:
            return False, f"a one-rank NCCL group failed: {log.strip().splitlines()[-1:]}", values
        if not network:
            return False, "NCCL's INIT log names no network (NCCL_DEBUG=INFO)", values
        ib_line = ib[0] if ib else "no NET/IB line"
        return True, (f"NCCL network: {network[0]} (NET/IB: {ib_line}); libibverbs: "
                      f"{verbs or 'not found (NCCL falls back to sockets between nodes)'}"), values

    return check


# ----------------------------------------------------------------------------------------------- all of them


def run_torch_only_checks(checks, *, model_dir: Path, hf_batch) -> None:
    """Add this file's checks to gpu_check.py's `checks` (PASS / FAIL / SKIPPED, each with why)."""
    checks.run("ipc_bucket_transfer", ipc_bucket_transfer())
    missing = config_importable()
    if missing:
        checks.skip("hf_policy_bf16_vs_cpu", missing)
    else:
        checks.run("hf_policy_bf16_vs_cpu", hf_policy_bf16_vs_cpu(model_dir, hf_batch))
    if not _on_gpu():
        checks.skip("chunked_logprobs_peak_memory", "no GPU: the peak is read from CUDA's allocator "
                                                    "(benchmarks/speed/logprob_memory.py measures the CPU)")
        checks.skip("nccl_transport", "no GPU: NCCL needs CUDA")
        return
    checks.run("chunked_logprobs_peak_memory", chunked_logprobs_peak_memory())
    checks.run("nccl_transport", nccl_transport())


if __name__ == "__main__" and sys.argv[1:2] == ["--hf-reference"]:
    model, work = Path(sys.argv[2]), Path(sys.argv[3])
    torch.save(hf_policy_pass(model, work / "batch.pt", precision="fp32"), work / "reference.pt")
