"""The `cipo-nemo` console script: training, plus one subcommand per other entry point of the package.

    cipo-nemo [train] [--config conf/X.yaml] [--dry-run] [key=value ...]   # = python -m cipo_nemo
    cipo-nemo config conf/X.yaml [key=value ...]                           # = python -m cipo_nemo.config
    cipo-nemo eval --model M --benchmarks B --n 8 --k 1,8 --output-dir D    # = python -m cipo_nemo.eval
    cipo-nemo export RUN_DIR/checkpoints/step_N OUT_DIR                     # = python -m cipo_nemo.export
    cipo-nemo samples ...                                                   # = python -m cipo_nemo.samples

A subcommand runs its module exactly as `python -m` would (runpy), so each keeps one argument parser, and only the
chosen one is imported: `cipo-nemo --help` answers without loading torch.
"""

from __future__ import annotations

import importlib.util
import runpy
import sys

# subcommand -> the module `python -m` runs for it
SUBCOMMANDS = {
    "config": "cipo_nemo.config",
    "eval": "cipo_nemo.eval",
    "export": "cipo_nemo.export",
    "samples": "cipo_nemo.samples",
}
TRAIN = "train"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        return run_module(SUBCOMMANDS[argv[0]], f"cipo-nemo {argv[0]}", argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[0])
        print(f"\nsubcommands: {TRAIN} (default), {', '.join(SUBCOMMANDS)}; `cipo-nemo <subcommand> --help` for each.\n")
    train_args = argv[1:] if argv and argv[0] == TRAIN else argv
    return run_module("cipo_nemo", "cipo-nemo", train_args)


def run_module(module: str, prog: str, args: list[str]) -> int:
    """Run `module` as `python -m module args` would; returns its exit status."""
    if importlib.util.find_spec(module) is None:
        print(f"{prog}: {module} is not part of this installation", file=sys.stderr)
        return 2
    saved_argv = sys.argv
    sys.argv = [prog, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as done:
        return exit_status(done.code)
    finally:
        sys.argv = saved_argv
    return 0


def exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # sys.exit("message") prints the message and exits 1
    return 1


if __name__ == "__main__":
    sys.exit(main())
