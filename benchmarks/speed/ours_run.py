"""Our GRPO/CIPO step through the real loop (cipo_nemo.trainer setup -> cipo_step per step -> shutdown): the
project side of benchmarks/speed/step_speed.py and benchmarks/speed/async_speed.py, run as its own process so its CPU
time is its own.

Steps run exactly as `cipo_nemo.loop.train` runs them (cipo_step, or async_step with async.enabled, then the
metrics line in metrics.jsonl), without validation, checkpoints or the final HF export, which are not part of a
step. Writes a JSON summary with each step's wall seconds and its `timing/*`, `tokens/*` and other step metrics.

    python benchmarks/speed/ours_run.py --config conf/cipo_smollm2_cpu.yaml --out ours.json key=value ...
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

STEP_KEYS_PREFIXES = ("timing/", "tokens/", "train/token_mult_prob_error", "reward/", "cipo/", "async/", "train/is_",
                      "train/tis_weight_mean", "train/samples_skipped/", "train/tokens_trained/", "train/loss",
                      "train/grad_norm", "train/optimizer_steps")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--save-weights", type=Path,
                        help="torch.save the final policy's HF-named weights here, in the dtype it trains in (to "
                        "compare runs: an HF directory would round them to the checkpoint's dtype, e.g. bf16)")
    parser.add_argument("overrides", nargs="*")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)  # the policy workers inherit it as OMP_NUM_THREADS (models/factory.py)
    from cipo_nemo.async_loop import async_step, attach_pipeline
    from cipo_nemo.config import load_config
    from cipo_nemo.trainer import cipo_step, setup, shutdown

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    started = time.perf_counter()
    components = setup(cfg)
    attach_pipeline(components)  # async.enabled: the rollout pipeline, as loop.train attaches it
    step_of = async_step if components.pipeline is not None else cipo_step
    setup_s = time.perf_counter() - started
    steps = []
    try:
        for step in range(1, cfg.grpo.num_steps + 1):
            step_started = time.perf_counter()
            metrics = step_of(components, step)
            components.metrics.log(step, metrics)
            wall = time.perf_counter() - step_started
            steps.append({"seconds": wall, **{k: v for k, v in metrics.items() if k.startswith(STEP_KEYS_PREFIXES)}})
            print(f"step {step}: {wall:.2f} s "
                  + " ".join(f"{k[7:]} {v:.2f}" for k, v in metrics.items() if k.startswith("timing/")), flush=True)
        if args.save_weights is not None:
            torch.save(dict(components.policy.export_hf_weights()), args.save_weights)
    finally:
        shutdown(components)
    timed = steps[1:]  # step 1 is warm-up
    summary = {
        "side": "ours",
        "policy": cfg.policy.backend,
        "generation": cfg.generation.backend,
        "cipo": cfg.cipo.enabled,
        "torch_threads": torch.get_num_threads(),
        "setup_s": setup_s,
        "wall_s": time.perf_counter() - started,
        "steps": steps,
        "median_step_s": statistics.median(s["seconds"] for s in timed) if timed else None,
        "run_dir": str(cfg.run.output_dir),
    }
    args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
