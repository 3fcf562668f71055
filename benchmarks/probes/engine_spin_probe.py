"""Does the vLLM engine's shared-memory busy-wait slow the Megatron train step that follows a rollout? (issue 14)

vLLM's worker process reads its work from a shared-memory queue and, after each message, busy-waits on it for
`SpinCondition.busy_loop_s` (1 s) with `sched_yield` before it blocks (vllm/distributed/device_communicators/
shm_broadcast.py). On this 2-core machine the policy trains on both cores right after the rollout, so the
spinning worker competes with torch's two OpenMP threads for up to that second.

One process holds, as the colocated loop does, one vLLM engine (the benchmark's fp32 SmolLM2, 2 prompts x 4
samples x 64 tokens) and one Megatron policy worker (a one-rank gloo world, fp32), and times `train` on a fixed
batch right after a rollout, under three conditions, alternating, `--repeats` times:

  after_rollout       train starts as soon as `generate` returns (what the loop does)
  after_rollout_pause train starts 1.5 s after `generate` returns (the spin is over)
  spin_off            like after_rollout, with the worker's busy-wait set to --spin-seconds (through a probe-only
                      collective_rpc; the loop's engines get cipo_nemo/models/generation/vllm_spin.py's CPU_SPIN_S)

and reports, per condition, the median train seconds and the CPU seconds the engine's processes used during the
train step. Run under the machine's lock: flock /tmp/cipo_heavy.lock env PYTHONPATH=$PWD python benchmarks/...
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is a local directory: no hub lookups
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import psutil  # noqa: E402
import torch  # noqa: E402

from benchmarks.common.batches import LOSS, rollout_shaped_batch  # noqa: E402
from benchmarks.speed.cpu_watch import CpuWatch  # noqa: E402
from cipo_nemo.config import load_config  # noqa: E402
from cipo_nemo.models.interfaces import SamplingSettings  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "conf" / "cipo_smollm2_cpu.yaml"
OVERRIDES = ["policy.precision=fp32", "data.system_prompt=null", "generation.temperature=1.0",
             "generation.top_p=1.0", "generation.max_new_tokens=64"]
PAUSE_S = 1.5


def set_worker_spin(worker, seconds: float | None) -> list[float]:
    """Runs inside each vLLM worker (collective_rpc): sets the busy-wait of its shared-memory queue readers
    (None: leaves it); returns what it was."""
    import gc

    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    readers = [o for o in gc.get_objects() if type(o) is SpinCondition and o.is_reader]  # type(): no weakproxy deref
    before = [reader.busy_loop_s for reader in readers]
    if seconds is not None:
        for reader in readers:
            reader.busy_loop_s = seconds
    return before


def engine_cpu_seconds(me: psutil.Process) -> float:
    total = 0.0
    for child in me.children(recursive=True):
        try:
            times = child.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--spin-seconds", type=float, default=0.05)
    parser.add_argument("--conditions", nargs="+", default=["after_rollout", "after_rollout_pause", "spin_off"])
    args = parser.parse_args()
    for name, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29533"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(name, value)
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # the probe ships set_worker_spin by value
    from cipo_nemo.models.generation.vllm_generation import VllmGeneration
    from cipo_nemo.models.hub import resolve_model_dir
    from cipo_nemo.models.policy.megatron_worker import MegatronPolicyWorker

    model_dir = str(resolve_model_dir(load_config(CONFIG, OVERRIDES).policy.model_name))
    cfg = load_config(CONFIG, [*OVERRIDES, f"policy.model_name={model_dir}"])
    engine = VllmGeneration(model_dir=model_dir, generation=cfg.generation,
                            max_model_len=cfg.policy.max_total_sequence_length, seed=0)
    policy = MegatronPolicyWorker(policy=cfg.policy, num_steps=1000, seed=0)
    vocab = 49152
    batch = rollout_shaped_batch(samples=8, vocab_size=vocab)
    denominator = float(LOSS.local_denominator([batch]))
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, vocab, (47,), generator=generator).tolist() for _ in range(2)]
    me = psutil.Process()
    print(f"worker readers' busy-wait as the engine started them (s): "
          f"{engine._engine.collective_rpc(set_worker_spin, args=(None,))}", flush=True)
    policy.train(batch, LOSS, global_denominator=denominator)  # warm-up

    def rollout(seed: int) -> float:
        settings = SamplingSettings(n=4, max_new_tokens=64, temperature=1.0, top_p=1.0, stop_strings=(), seed=seed)
        started = time.perf_counter()
        engine.generate(prompts, settings)
        return time.perf_counter() - started

    results: dict[str, dict[str, list[float]]] = {c: {"train": [], "engine_cpu": [], "rollout": []}
                                                  for c in args.conditions}
    rollout(0)
    watch = CpuWatch().__enter__()
    for repeat in range(args.repeats):
        for condition in args.conditions:
            spin = args.spin_seconds if condition == "spin_off" else 1.0  # 1.0: vLLM's own busy-wait
            readers = engine._engine.collective_rpc(set_worker_spin, args=(spin,))
            rollout_s = rollout(repeat)
            if condition == "after_rollout_pause":
                time.sleep(PAUSE_S)
            engine_before = engine_cpu_seconds(me)
            started = time.perf_counter()
            policy.train(batch, LOSS, global_denominator=denominator)
            results[condition]["train"].append(time.perf_counter() - started)
            results[condition]["engine_cpu"].append(engine_cpu_seconds(me) - engine_before)
            results[condition]["rollout"].append(rollout_s)
        print(f"repeat {repeat}: last spin setting, per worker, was {readers}; "
              + "; ".join(f"{c} train {r['train'][-1]:.2f} s (engine CPU {r['engine_cpu'][-1]:.2f} s, rollout "
                          f"{r['rollout'][-1]:.2f} s)" for c, r in results.items()), flush=True)
    watch.__exit__(None, None, None)
    print(f"other processes' CPU during the timed repeats: {watch.report.other_s:.1f} s in "
          f"{watch.report.wall_s:.0f} s ({watch.report.other_share:.1%} of a core)")
    print(f"\n{'condition':<22} {'train median s':>15} {'min':>6} {'engine CPU s during train':>26} "
          f"{'rollout median s':>17}")
    for condition, r in results.items():
        print(f"{condition:<22} {statistics.median(r['train']):>15.2f} {min(r['train']):>6.2f} "
              f"{statistics.median(r['engine_cpu']):>26.2f} {statistics.median(r['rollout']):>17.2f}")
    engine.shutdown()
    policy.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
