"""Print the fully resolved, validated config: `python -m cipo_nemo.config conf/X.yaml [key=value ...]`."""

import argparse
import sys

from cipo_nemo.config import ConfigError, load_config, to_yaml


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cipo_nemo.config", description=__doc__)
    parser.add_argument("config", help="YAML file, e.g. conf/cipo_base.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value, +new.key=value or ++key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}".replace("\n", "\nconfig error: "), file=sys.stderr)
        return 2
    print(to_yaml(cfg), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
