"""A supervised warm-up of the answer *format* only, from SmolLM2-135M-Instruct's own results (issue 15 item 1).

The task screen (docs/results/task_screen.md) found no task in the pass@1 band for the base model, and showed why:
asked for the calculation, the model often writes it and its result ("3 + 6 = 9"), but never in a form the verifier
accepts; asked for "The answer is N." it guesses without calculating. The issue allows a short supervised format
warm-up shared by both arms of the study, the answer format only. This one teaches the form
"<expression> = <N>. The answer is <N>." where N is **the model's own result**, right or wrong, never the gold answer:

1. sample the base model (``calc`` format, temperature 0.5) on ``--problems`` training-split problems x ``--n``;
2. keep the replies that hold a result, ``= N`` (:func:`model_result`: the first one, a fixed rule that never looks at
   the gold answer), and write the target ``f"{expression} = {N}. The answer is {N}."`` (the expression is the
   problem's own, restated);
3. fine-tune on (the ``calc_answer_is`` prompt, target) pairs, loss on the target tokens and the end of turn, and save
   an HF directory (``--out``).

The data (every sampled reply, the extracted result, whether it is right, the target) and the settings go to
``--record`` (committed), so the warm-up is documented with its data. Then screen the result:

    python benchmarks/studies/format_warmup.py --out ~/.cache/cipo_nemo/smollm2-135m-format-warmup
    python benchmarks/studies/screen_tasks.py --configs ba_1d2t_calc_answer_is --temperature 0.5 \\
        --model ~/.cache/cipo_nemo/smollm2-135m-format-warmup --model-tag warm
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import re
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from benchmarks.studies.screen_tasks import CONFIG, FORMATS, Engine, _arith, heavy_lock  # noqa: E402
from cipo_nemo.algorithms.rewards import SUCCESS_THRESHOLD  # noqa: E402
from cipo_nemo.config import load_config  # noqa: E402
from cipo_nemo.eval.benchmarks import reasoning_gym_benchmark  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WARMUP_SEED = 517  # generator seed of the warm-up problems: not the screen's (515, 516) nor the eval default's
SAMPLE_FORMAT = "calc"  # what the base model is asked when its results are collected
TARGET_FORMAT = "calc_answer_is"  # the prompt the warm-up trains under (and the study uses)
RESULT = re.compile(r"=\s*(-?\d+)")

logger = logging.getLogger("format_warmup")


def model_result(response: str) -> str | None:
    """The model's own result: the number after the first '=' in its reply (None: no result written)."""
    match = RESULT.search(response)
    return match.group(1) if match else None


def warmup_target(expression: str, result: str) -> str:
    """The taught form: the problem's expression, the model's result, the answer marker the verifier reads."""
    return f"{expression} = {result}. The answer is {result}."


def build_rows(items: Sequence[Any], samples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per sampled reply: the reply, the model's result (or None), whether the reply was right by the
    verifier, and the target when the reply holds a result."""
    by_id = {item.id: item for item in items}
    rows = []
    for record in samples:
        item = by_id[record["id"]]
        for response, reward in zip(record["responses"], record["rewards"]):
            result = model_result(response)
            rows.append({"id": item.id, "problem": item.prompt, "gold": item.answer, "response": response,
                         "result": result, "result_is_gold": result is not None and result == item.answer,
                         "reply_right": reward > SUCCESS_THRESHOLD,
                         "target": None if result is None else warmup_target(item.metadata["expression"], result)})
    return rows


def summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    with_result = [row for row in rows if row["result"] is not None]
    return {"replies": len(rows), "with_result": len(with_result),
            "result_is_gold": sum(row["result_is_gold"] for row in with_result),
            "reply_right": sum(row["reply_right"] for row in rows)}


# ---------------------------------------------------------------------------------------------- fine-tuning


def training_pairs(rows: Iterable[Mapping[str, Any]], items: Sequence[Any], *, tokenizer: Any,
                   data_cfg: Any) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, target ids + end of turn) for every row with a target, the prompt rendered as training does."""
    from cipo_nemo.data.prompts import encode_prompts, render_prompt

    by_id = {item.id: item for item in items}
    pairs = []
    for row in rows:
        if row["target"] is None:
            continue
        prompt = render_prompt(by_id[row["id"]], tokenizer=tokenizer, instructions=data_cfg.instructions,
                               system_prompt=data_cfg.system_prompt, template_kwargs=data_cfg.chat_template_kwargs)
        target = tokenizer(row["target"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        pairs.append((encode_prompts([prompt], tokenizer=tokenizer)[0], target))
    return pairs


def batch_tensors(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-padded input ids, attention mask and labels (-100 on the prompt and the padding)."""
    import torch

    width = max(len(prompt) + len(target) for prompt, target in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, (prompt, target) in enumerate(pairs):
        sequence = prompt + target
        ids[row, :len(sequence)] = torch.tensor(sequence)
        labels[row, len(prompt):len(sequence)] = torch.tensor(target)
        mask[row, :len(sequence)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def fine_tune(model_dir: Path, pairs: list[tuple[list[int], list[int]]], out: Path, *, lr: float, batch_size: int,
              epochs: int, seed: int) -> list[float]:
    """AdamW on the target tokens, constant lr, bf16 autocast where the CPU has it. A plain loop rather than
    transformers' Trainer: a few dozen steps of one small model need none of its machinery. Returns the losses."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cipo_nemo.models.policy.megatron_setup import cpu_has_native_bf16

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    order = list(range(len(pairs)))
    losses = []
    steps = epochs * math.ceil(len(pairs) / batch_size)
    start = time.monotonic()
    for epoch in range(epochs):
        random.Random(seed + epoch).shuffle(order)
        for first in range(0, len(order), batch_size):
            batch = batch_tensors([pairs[i] for i in order[first:first + batch_size]], tokenizer.pad_token_id)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_has_native_bf16()):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            logger.info("step %d/%d loss %.4f (%.0f s)", len(losses), steps, losses[-1], time.monotonic() - start)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return losses


# ---------------------------------------------------------------------------------------------- running


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the warmed model's HF directory")
    parser.add_argument("--record", type=Path, default=REPO / "docs" / "results" / "format_warmup.jsonl",
                        help="the warm-up's data and settings (JSONL: a header line, then one line per reply)")
    parser.add_argument("--problems", type=int, default=256)
    parser.add_argument("--n", type=int, default=4, help="samples per problem")
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from cipo_nemo.eval.harness import evaluate_benchmarks
    from cipo_nemo.models.hub import resolve_model_dir

    cfg = load_config(CONFIG, [])
    model_dir = resolve_model_dir(cfg.policy.model_name)
    bench = reasoning_gym_benchmark("basic_arithmetic", size=args.problems, seed=WARMUP_SEED, options=_arith(1, 2),
                                    label="format warm-up")
    engine = Engine(cfg)
    with heavy_lock():
        try:
            context = engine.context(FORMATS[SAMPLE_FORMAT], args.temperature)
            _, samples = evaluate_benchmarks([bench], context, n=args.n, k_list=[1], max_items=None, seed=args.seed)
            tokenizer = engine.parts["tokenizer"]
        finally:
            engine.close()
        rows = build_rows(bench.items, samples)
        target_format = FORMATS[TARGET_FORMAT]
        data_cfg = cfg.data.model_copy(update={"instructions": cfg.data.instructions.model_copy(
            update={"math": target_format.instruction}), "system_prompt": target_format.system_prompt})
        pairs = training_pairs(rows, bench.items, tokenizer=tokenizer, data_cfg=data_cfg)
        logger.info("%s; %d training pairs", summary(rows), len(pairs))
        losses = fine_tune(model_dir, pairs, args.out, lr=args.lr, batch_size=args.batch_size, epochs=args.epochs,
                           seed=args.seed)
    header = {"base_model": str(cfg.policy.model_name), "model_dir": str(model_dir), "out": str(args.out),
              "generator": "basic_arithmetic", "options": _arith(1, 2), "generator_seed": WARMUP_SEED,
              "sample_format": SAMPLE_FORMAT, "sample_instruction": FORMATS[SAMPLE_FORMAT].instruction,
              "target_format": TARGET_FORMAT, "target_instruction": target_format.instruction,
              "temperature": args.temperature, "n": args.n, "lr": args.lr, "batch_size": args.batch_size,
              "epochs": args.epochs, "seed": args.seed, "pairs": len(pairs), "losses": losses, **summary(rows)}
    args.record.parent.mkdir(parents=True, exist_ok=True)
    with args.record.open("w") as handle:
        for line in [header, *rows]:
            handle.write(json.dumps(line) + "\n")
    print(json.dumps({key: value for key, value in header.items() if key != "losses"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
