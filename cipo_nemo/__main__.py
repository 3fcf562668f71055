"""`python -m cipo_nemo [--config conf/X.yaml] [key=value ...]`

Today this runs the preflight of a CIPO (or GRPO) run: the config is resolved and validated, the data loaded and
counted, the gold answers checked against the verifier, and the per-step plan printed. The training loop
(Megatron policy, vLLM generation, Ray) plugs in after the preflight and is not in this tree yet.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cipo_nemo.config import ConfigError, load_config
from cipo_nemo.data.sources import DataError
from cipo_nemo.preflight import run_preflight

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "conf" / "cipo_base.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cipo_nemo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"YAML config (default: {DEFAULT_CONFIG.name})")
    parser.add_argument("overrides", nargs="*", help="key.sub=value, +new.key=value or ++key=value")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        report = run_preflight(cfg)
    except (ConfigError, DataError) as err:
        kind = "config" if isinstance(err, ConfigError) else "data"
        print(f"{kind} error: {err}".replace("\n", f"\n{kind} error: "), file=sys.stderr)
        return 2
    algorithm = "CIPO" if cfg.cipo.enabled else "GRPO"
    print(f"{algorithm} run '{cfg.run.name}' ({args.config}), {cfg.grpo.num_steps} steps, output {cfg.run.output_dir}")
    for line in report.lines():
        print(f"  {line}")
    print("preflight passed; the training loop (Megatron + vLLM on Ray) is not part of this tree yet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
