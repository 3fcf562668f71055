"""Command line: a training checkpoint as a Hugging Face model directory.

    python -m cipo_nemo.export RUN_DIR/checkpoints/step_N OUT_DIR      # or: cipo-nemo export ...

Works for a checkpoint of any step and any TP/PP layout (the checkpoint's config.yaml says which; it is loaded
resharded on this one process), Megatron or HF backend; `RUN_DIR/checkpoints/best.json` names the best checkpoint
when the run kept one (`checkpointing.keep_best`). OUT_DIR (new, or an empty directory) gets config.json,
safetensors weights and the tokenizer: `transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)` loads it, and
`python -m cipo_nemo.eval --model` takes it (or the checkpoint itself). The run's base model
(`policy.model_name`) must still be readable. A problem with the arguments is one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cipo_nemo.models.policy.checkpoint_export import ExportError, export_checkpoint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cipo_nemo.export",
                                     description="Write a training checkpoint as a Hugging Face model directory.")
    parser.add_argument("checkpoint", type=Path, help="a complete checkpoint: RUN_DIR/checkpoints/step_N")
    parser.add_argument("out_dir", type=Path, help="the HF directory to write (must not exist, or be empty)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out_dir = export_checkpoint(args.checkpoint, args.out_dir)
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"hf_model: {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
