"""The zero-advantage skip on the instruct study's configuration, side by side (issue 28 item 5).

conf/study_smollm2_warm.yaml (the format-warmed SmolLM2-135M, 8 prompts x 4 samples, CIPO with up to 4 anchors x
4 corrections, Megatron + vLLM) for --steps steps: GRPO and CIPO, each with the skip on (the default) and off, one
run after the other, alternating on/off, with the same seed, so both runs of an arm start from the same weights and
sample their first step alike. Reports per run the median seconds per step (steps 2..N) and per stage, and the
response tokens the train passes computed; per arm the on/off step ratio against the goal, the largest per-step
difference of the training curves (base and correction reward) and of the weights after the last step, next to
how far training moved the weights at all.

    python benchmarks/speed/zero_advantage_skip.py --steps 20           # ~45 min on 2 cores
    python benchmarks/speed/zero_advantage_skip.py --steps 3 --arms grpo   # smoke
    python benchmarks/speed/zero_advantage_skip.py --steps 20 --reuse   # after an interruption: only what is missing

Needs the warmed model (benchmarks/studies/format_warmup.py --out ~/.cache/cipo_nemo/smollm2-135m-format-warmup).
Holds /tmp/cipo_heavy.lock for the runs, like step_speed.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from benchmarks.speed.step_speed import NO_SKIP, heavy_lock, median_of, run_ours, stage_medians  # noqa: E402

CONFIG = REPO / "conf" / "study_smollm2_warm.yaml"
ARMS = {"grpo": "cipo.enabled=false", "cipo": "cipo.enabled=true"}
GOALS = {"grpo": 0.75, "cipo": 0.6}  # the skip's step time / today's (without it), issue 28


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=list(ARMS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=REPO / "results" / "zero_advantage_skip")
    parser.add_argument("--reuse", action="store_true",
                        help="keep runs of --output-dir that finished (summary and weights saved): an interrupted "
                             "benchmark goes on where it stopped")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (step 1 is warm-up)")
    return args


def overrides(args: argparse.Namespace, run_dir: Path, arm: str, skip: bool) -> list[str]:
    """The study's configuration as it trains (no validation, checkpoints or dumps: not part of a step)."""
    return [f"run.output_dir={run_dir}", f"run.seed={args.seed}", f"grpo.num_steps={args.steps}", ARMS[arm],
            "validation.every=0", "logger.samples_every=0", "logger.plot=false", "logger.tensorboard=false",
            "checkpointing.resume=never", *(() if skip else (NO_SKIP,))]


def load_weights(path: Path) -> dict:
    """HF-named tensors: a run's --save-weights file, or an HF directory's safetensors (the start model)."""
    import torch
    from safetensors.torch import load_file

    if path.is_file():
        return torch.load(path, weights_only=True)
    weights: dict = {}
    for shard in sorted(path.glob("*.safetensors")):
        weights.update(load_file(shard))
    return weights


def max_weight_diff(a: dict, b: dict) -> float:
    return max(float((a[name].double() - b[name].double()).abs().max()) for name in a if name in b)


def curve_gap(on: dict, off: dict, key: str) -> float | None:
    """The largest per-step |on - off| of a training metric (None when neither run has it)."""
    pairs = [(x.get(key), y.get(key)) for x, y in zip(on["steps"], off["steps"])]
    gaps = [abs(x - y) for x, y in pairs if x is not None and y is not None]
    return max(gaps) if gaps else None


def arm_report(arm: str, on: dict, off: dict, weights: dict[str, dict], start: dict) -> list[str]:
    ratio = on["median_step_s"] / off["median_step_s"]
    lines = [f"{arm.upper()}: skip on / off = {ratio:.2f} ({on['median_step_s']:.2f} / {off['median_step_s']:.2f} "
             f"s/step; goal <= {GOALS[arm]}: {'met' if ratio <= GOALS[arm] else 'NOT met'})"]
    for name, summary in (("on", on), ("off", off)):
        stages = stage_medians(summary)
        trained = sum(median_of(summary["steps"], f"train/tokens_trained/{s}") for s in ("base", "correction"))
        skipped = sum(median_of(summary["steps"], f"train/samples_skipped/{s}") for s in ("base", "correction"))
        lines.append(f"  {name:>3}: " + " ".join(f"{k} {v:.2f}" for k, v in stages.items() if v >= 0.005)
                     + f" | response tokens trained {trained:.0f}, samples skipped {skipped:.0f} (medians)")
    gaps = {key: curve_gap(on, off, key) for key in ("reward/base_mean", "reward/correction_mean", "train/loss")}
    lines.append("  largest per-step difference on - off: "
                 + ", ".join(f"{k} {v:.4f}" for k, v in gaps.items() if v is not None))
    moved = max_weight_diff(weights["off"], start)
    lines.append(f"  weights after step {len(on['steps'])}: max |on - off| {max_weight_diff(weights['on'], weights['off']):.2e} "
                 f"(training moved them by up to {moved:.2e} from the start)")
    return lines


CURVES = (("reward/base_mean", "base reward"), ("reward/correction_mean", "correction reward"), ("seconds", "s/step"))


def plot_curves(runs: dict[str, dict[str, dict]], path: Path) -> None:
    """Per arm (rows), the training curves with the skip on and off (columns: base, correction reward, seconds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), len(CURVES), figsize=(4 * len(CURVES), 3 * len(runs)), squeeze=False)
    for row, (arm, summaries) in zip(axes, runs.items()):
        for ax, (key, label) in zip(row, CURVES):
            for name, style in (("on", "-"), ("off", "--")):
                points = [(i + 1, step[key]) for i, step in enumerate(summaries[name]["steps"])
                          if step.get(key) is not None]
                if points:
                    ax.plot(*zip(*points), style, marker=".", label=f"skip {name}")
            ax.set_title(f"{arm.upper()}: {label}")
            ax.set_xlabel("step")
            if ax.lines:
                ax.legend()
            else:
                ax.text(0.5, 0.5, "no such stream", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cipo_nemo.config import load_config
    from cipo_nemo.models.hub import resolve_model_dir

    model_dir = resolve_model_dir(load_config(CONFIG).policy.model_name)
    if not Path(model_dir).is_dir():
        raise SystemExit(f"{model_dir} does not exist: run benchmarks/studies/format_warmup.py --out {model_dir}")
    out_dir = args.output_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    start = load_weights(Path(model_dir))
    lines = [f"zero-advantage skip on {CONFIG.name}: {args.steps} steps, seed {args.seed}, {args.threads} threads", ""]
    runs: dict[str, dict[str, dict]] = {}
    with heavy_lock():
        started = time.monotonic()
        for arm in args.arms:
            summaries, weights = {}, {}
            for name, skip in (("on", True), ("off", False)):
                run = f"{arm}_skip_{name}"
                summary_file, weights_file = out_dir / f"{run}.json", out_dir / f"{run}_weights.pt"
                if args.reuse and summary_file.is_file() and weights_file.is_file():
                    print(f"--- {run}: reusing {summary_file}", flush=True)
                    summaries[name] = json.loads(summary_file.read_text())
                else:
                    summaries[name] = run_ours(run, CONFIG, overrides(args, out_dir / run, arm, skip),
                                               out_dir=out_dir, threads=args.threads, save_weights=weights_file)
                weights[name] = load_weights(out_dir / f"{run}_weights.pt")
            lines += arm_report(arm, summaries["on"], summaries["off"], weights, start)
            runs[arm] = summaries
    plot_curves(runs, out_dir / "curves.png")
    contaminated = [p.stem for p in out_dir.glob("*_skip_*.json")
                    if json.loads(p.read_text())["cpu"]["other_share"] > 0.05]
    lines += ["", f"runs with other processes above 5% of a core: {', '.join(sorted(contaminated)) or 'none'}",
              f"whole benchmark: {time.monotonic() - started:.0f} s; summaries and curves.png in {out_dir}"]
    print("\n".join(lines))
    (out_dir / "report.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
