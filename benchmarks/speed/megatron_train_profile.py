"""Where the Megatron train step's time goes, against our HF policy on the same batch (issue 14, item 3).

Builds, in one process (a one-rank gloo world), our HF policy and one Megatron policy worker per variant from the
same SmolLM2-135M-Instruct directory the step-speed benchmark uses (fp32), a batch shaped like that benchmark's
(8 samples, prompts of 44-50 tokens, responses of 56-64 tokens), and times `train` on it, alternating the
variants `--repeats` times after one warm-up step each, so that load changes hit every variant alike. The
Megatron train step is split into its phases (zero-grad + schedule = forward/backward, optimizer step) by timing
the worker's `_run_schedule` and its optimizer's `step`. `--profile` adds one torch.profiler step per variant
(top ops by self CPU time) and counts the Python calls the CPU compatibility mode (cpu_compat.py) intercepts.

    python benchmarks/speed/megatron_train_profile.py  # hf, megatron, megatron_dp1_collectives, megatron_no_distopt
    python benchmarks/speed/megatron_train_profile.py --variants hf megatron megatron_packed hf_packed \\
        --profile --cprofile

`megatron_dp1_collectives` is `megatron` with the distributed optimizer's one-rank all-gather / reduce-scatter put
back (cpu_compat skips them at DP 1): the A/B of that change in one run. `megatron_every_position` and
`hf_every_position` project every position in the training pass, not only those that predict a response token.

Run it under the machine's shared lock (flock /tmp/cipo_heavy.lock ...): other load slows torch's threads 20-300x.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is a local directory: no hub lookups
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks.common.batches import LOSS, rollout_shaped_batch  # noqa: E402
from benchmarks.speed.cpu_watch import CpuWatch  # noqa: E402
from cipo_nemo.config import load_config  # noqa: E402
from cipo_nemo.data.batch import Batch  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "conf" / "cipo_smollm2_cpu.yaml"
# variant -> (backend, policy overrides on top of the step-speed benchmark's fp32 policy)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "hf": ("hf", []),
    "megatron": ("megatron", []),
    "megatron_no_distopt": ("megatron", ["policy.megatron.distributed_optimizer=false"]),
    "megatron_packed": ("megatron", ["policy.sequence_packing=true"]),
    "megatron_packed_no_distopt": ("megatron", ["policy.sequence_packing=true",
                                                "policy.megatron.distributed_optimizer=false"]),
    "hf_packed": ("hf", ["policy.sequence_packing=true"]),
    "megatron_unfused_attention": ("megatron", ["policy.megatron.local_core_attention=megatron"]),
    # "megatron" with gloo's one-rank all-gather / reduce-scatter of the DDP buffers put back (the state before
    # cpu_compat skipped them at DP 1)
    "megatron_dp1_collectives": ("megatron", []),
    # the training pass's output projection over every position, prompt included (before it took the response
    # positions only, as TRL's logits_to_keep does)
    "megatron_every_position": ("megatron", []),
    "hf_every_position": ("hf", []),
}
WITH_DP1_COLLECTIVES = {"megatron_dp1_collectives"}
EVERY_POSITION = {"megatron_every_position", "hf_every_position"}


@contextlib.contextmanager
def every_position(on: bool):
    """Temporarily make both policies' training pass project every position (no trained-position selection)."""
    from cipo_nemo.models.policy import hf_policy, megatron_worker

    patched = hf_policy.trained_positions, megatron_worker.trained_positions
    if on:
        hf_policy.trained_positions = megatron_worker.trained_positions = lambda response_mask: None
    try:
        yield
    finally:
        hf_policy.trained_positions, megatron_worker.trained_positions = patched


@contextlib.contextmanager
def dp1_collectives(on: bool):
    """Temporarily restore megatron's buffer collectives that cpu_compat skips for one-rank groups."""
    import megatron.core.distributed.param_and_grad_buffer as buffers

    patched = buffers.dist_all_gather_func, buffers.dist_reduce_scatter_func
    if on:
        buffers.dist_all_gather_func = getattr(patched[0], "__wrapped__", patched[0])
        buffers.dist_reduce_scatter_func = getattr(patched[1], "__wrapped__", patched[1])
    try:
        yield
    finally:
        buffers.dist_all_gather_func, buffers.dist_reduce_scatter_func = patched


def policy_config(overrides: list[str], model_dir: Path | None = None):
    base = ["policy.precision=fp32", "data.system_prompt=null"]
    if model_dir is not None:  # the resolved directory, as the loop's factory passes it (no hub lookups)
        base.append(f"policy.model_name={model_dir}")
    return load_config(CONFIG, base + overrides).policy


def build_policy(backend: str, overrides: list[str], model_dir: Path):
    config = policy_config(overrides, model_dir)
    if backend == "hf":
        from cipo_nemo.models.policy.hf_policy import HFPolicy

        return HFPolicy(policy=config, num_steps=1000, seed=0)
    from cipo_nemo.models.policy.megatron_worker import MegatronPolicyWorker

    worker = MegatronPolicyWorker(policy=config, num_steps=1000, seed=0)
    _time_phases(worker)
    return worker


def _time_phases(worker) -> None:
    """Record the seconds of the worker's forward/backward schedule and optimizer step per train call."""
    worker.phase_seconds = {"schedule": [], "optimizer": []}
    schedule, step = worker._run_schedule, worker._optimizer.step

    def timed_schedule(*args, **kwargs):
        started = time.perf_counter()
        try:
            return schedule(*args, **kwargs)
        finally:
            if not kwargs.get("forward_only"):
                worker.phase_seconds["schedule"].append(time.perf_counter() - started)

    def timed_step(*args, **kwargs):
        started = time.perf_counter()
        try:
            return step(*args, **kwargs)
        finally:
            worker.phase_seconds["optimizer"].append(time.perf_counter() - started)

    worker._run_schedule, worker._optimizer.step = timed_schedule, timed_step


def train_once(policy, batch: Batch, denominator: float) -> tuple[float, float]:
    with dp1_collectives(getattr(policy, "dp1_collectives", False)), every_position(policy.every_position):
        started = time.perf_counter()
        metrics = policy.train(batch, LOSS, global_denominator=denominator)
        return time.perf_counter() - started, metrics["loss"]


class _CountingMode:
    """Counts the torch calls the CPU compatibility mode intercepts (each one is a Python hop)."""

    def __init__(self) -> None:
        from cipo_nemo.models.policy import cpu_compat

        self.mode = cpu_compat._cpu_compat_mode
        self.calls: Counter[str] = Counter()

    def __enter__(self):
        if self.mode is None:
            return self
        original = type(self.mode).__torch_function__
        calls = self.calls

        def counting(mode, func, types, args=(), kwargs=None):
            calls[getattr(func, "__name__", str(func))] += 1
            return original(mode, func, types, args, kwargs)

        self._original = original
        type(self.mode).__torch_function__ = counting
        return self

    def __exit__(self, *exc) -> None:
        if self.mode is not None:
            type(self.mode).__torch_function__ = self._original


def mode_cost_per_call() -> float:
    """Seconds one intercepted call costs on top of the op (a tiny add, with and without the mode)."""
    from cipo_nemo.models.policy import cpu_compat

    x = torch.ones(4)
    mode = cpu_compat._cpu_compat_mode

    def loop() -> float:
        started = time.perf_counter()
        for _ in range(20000):
            torch.add(x, x)
        return (time.perf_counter() - started) / 20000

    with_mode = min(loop() for _ in range(3))
    mode.__exit__(None, None, None)
    try:
        without = min(loop() for _ in range(3))
    finally:
        mode.__enter__()
    return with_mode - without


def profile_step(name: str, policy, batch: Batch, denominator: float, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    with _CountingMode() as counting, profile(activities=[ProfilerActivity.CPU]) as prof:
        train_once(policy, batch, denominator)
    print(f"\n--- torch.profiler, one train step: {name}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48))
    if counting.calls:
        total = sum(counting.calls.values())
        print(f"CPU compatibility mode: {total} intercepted torch calls; most: {counting.calls.most_common(8)}")


def cprofile_step(name: str, policy, batch: Batch, denominator: float, top: int) -> None:
    """Python functions by cumulative wall time in one train step (collectives' waits included)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    train_once(policy, batch, denominator)
    profiler.disable()
    print(f"\n--- cProfile, one train step: {name}")
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(top)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS),
                        default=["hf", "megatron", "megatron_dp1_collectives", "megatron_no_distopt"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--profile", action="store_true", help="one torch.profiler step per variant")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--cprofile", action="store_true", help="one cProfile step per variant (wall time per call)")
    args = parser.parse_args()
    for name, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29531"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(name, value)
    torch.manual_seed(0)
    from cipo_nemo.models.hub import resolve_model_dir

    model_dir = resolve_model_dir(policy_config([]).model_name)
    vocab_size = len(__import__("transformers").AutoTokenizer.from_pretrained(model_dir))
    batch = rollout_shaped_batch(samples=args.samples, vocab_size=vocab_size)
    denominator = float(LOSS.local_denominator([batch]))
    print(f"model {model_dir}; batch {args.samples} x {batch['input_ids'].shape[1]} (right-padded), "
          f"{int(batch['prompt_mask'].sum() + batch['response_mask'].sum())} real tokens; "
          f"torch threads {torch.get_num_threads()}")
    policies = {}
    for name in args.variants:
        backend, overrides = VARIANTS[name]
        policies[name] = build_policy(backend, overrides, model_dir)
        policies[name].dp1_collectives = name in WITH_DP1_COLLECTIVES
        policies[name].every_position = name in EVERY_POSITION
        train_once(policies[name], batch, denominator)  # warm-up (optimizer state, buffers)
        for phases in getattr(policies[name], "phase_seconds", {}).values():
            phases.clear()
    seconds: dict[str, list[float]] = {name: [] for name in policies}
    losses: dict[str, list[float]] = {name: [] for name in policies}
    with CpuWatch() as watch:
        for _ in range(args.repeats):
            for name, policy in policies.items():
                elapsed, loss = train_once(policy, batch, denominator)
                seconds[name].append(elapsed)
                losses[name].append(loss)
    report = watch.report
    print(f"other processes' CPU during the timed steps: {report.other_s:.1f} s in {report.wall_s:.0f} s "
          f"({report.other_share:.1%} of a core)")
    reference = statistics.median(seconds[args.variants[0]])
    print(f"\n{'variant':<28} {'median s':>9} {'min s':>7} {'x ' + args.variants[0]:>8}  phases (median s)  all s")
    for name in policies:
        phases = getattr(policies[name], "phase_seconds", {})
        phase_text = " ".join(f"{k} {statistics.median(v):.2f}" for k, v in phases.items() if v)
        print(f"{name:<28} {statistics.median(seconds[name]):>9.2f} {min(seconds[name]):>7.2f} "
              f"{statistics.median(seconds[name]) / reference:>8.2f}  {phase_text:<30} "
              + " ".join(f"{s:.2f}" for s in seconds[name]))
    print("losses per repeat (same weights drift apart by variant, first repeat comparable):",
          {name: [round(v, 6) for v in values[:1]] for name, values in losses.items()})
    if args.profile:
        if any(VARIANTS[name][0] == "megatron" for name in policies):
            print(f"\nCPU compatibility mode: {mode_cost_per_call() * 1e6:.1f} us per intercepted call")
        for name, policy in policies.items():
            profile_step(name, policy, batch, denominator, args.top)
    if args.cprofile:
        for name, policy in policies.items():
            cprofile_step(name, policy, batch, denominator, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
