"""Samples a person can read: what each stream of a step trained on.

Every `logger.samples_every` steps the trainer writes `<run_dir>/samples/step_<N>.jsonl`, one JSON object per
sample of the step's training batch (after the advantages): the prompt as the model saw it, the response, its
verifier reward and reason, the shaped reward and the advantage it trained with, whether it carries gradient, and for
corrections also the anchor (its text, reward and verdict) and the outcome: fixed (wrong anchor, right correction),
broken (right -> wrong), kept (right -> right) or unfixed (wrong -> wrong).

    python -m cipo_nemo.samples RUN_DIR [--step N] [--kind base|correction] [--max-chars N]

prints a step's samples group by group (the latest step by default), long texts shortened in the middle.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cipo_nemo.algorithms.anchors import AnchorSelection
from cipo_nemo.algorithms.rewards import SUCCESS_THRESHOLD
from cipo_nemo.data.batch import Batch
from cipo_nemo.data.sources import TaskItem

SAMPLES_DIR = "samples"
OUTCOMES = ("fixed", "broken", "kept", "unfixed")
DUMP_KEYS = ("input_ids", "prompt_mask", "response_text", "verifier_reason", "item_index", "rewards", "shaped_rewards",
             "advantages", "carries_gradient", "anchor_index")


# ----------------------------------------------------------------------------------------------- writing


def correction_outcome(anchor_correct: bool, reward: float) -> str:
    """fixed / broken / kept / unfixed from the anchor's verdict and the correction's raw reward."""
    correct = reward > SUCCESS_THRESHOLD
    if anchor_correct:
        return "kept" if correct else "broken"
    return "fixed" if correct else "unfixed"


def sample_records(
    batch: Batch, anchors: AnchorSelection | None, *, items: Sequence[TaskItem], tokenizer: Any, step: int
) -> list[dict[str, Any]]:
    """One record per sample of a step's training batch (`correction.join_streams`, then
    `training_signal.training_signal`: this reads the shaped rewards and advantages it wrote, never recomputes them).

    The base samples come first in the joint batch, in rollout order, so an anchor's position in the joint batch
    is `anchors.indices[anchor_index]`."""
    missing = [key for key in DUMP_KEYS if key not in batch]
    if missing:
        raise ValueError(f"the batch lacks {missing} (dump it after trainer.compute_advantages); keys: {list(batch.keys())}")
    prompts = [tokenizer.decode(ids[mask].tolist(), skip_special_tokens=False)
               for ids, mask in zip(batch["input_ids"], batch["prompt_mask"])]
    return [_record(batch, i, prompts[i], anchors, items, step) for i in range(len(batch))]


def _record(batch: Batch, i: int, prompt: str, anchors: AnchorSelection | None, items: Sequence[TaskItem],
            step: int) -> dict[str, Any]:
    item = items[batch["item_index"][i]]
    record: dict[str, Any] = {
        "step": step,
        "index": i,
        "kind": batch["sample_kind"][i],
        "group_id": int(batch["group_id"][i]),
        "item_id": item.id,
        "answer": item.answer if isinstance(item.answer, str) else None,  # code tests are not repeated per sample
        "prompt": prompt,
        "response": batch["response_text"][i],
        "finish_reason": batch["finish_reason"][i] if "finish_reason" in batch else None,
        "reward": float(batch["rewards"][i]),
        "verifier_reason": batch["verifier_reason"][i],
        "shaped_reward": float(batch["shaped_rewards"][i]),
        "advantage": float(batch["advantages"][i]),
        "carries_gradient": bool(batch["carries_gradient"][i]),
    }
    if record["kind"] == "correction":
        record.update(_correction_fields(batch, i, anchors))
    return record


def _correction_fields(batch: Batch, i: int, anchors: AnchorSelection | None) -> dict[str, Any]:
    if anchors is None:
        raise ValueError(f"sample {i} is a correction but no AnchorSelection was given")
    position = int(batch["anchor_index"][i])
    anchor = anchors.indices[position]  # the anchor's base sample, at the same position in the joint batch
    anchor_correct = anchors.anchor_correct[position]
    return {
        "outcome": correction_outcome(anchor_correct, float(batch["rewards"][i])),
        "anchor": {
            "index": anchor,
            "correct": anchor_correct,
            "reward": float(batch["rewards"][anchor]),
            "verifier_reason": batch["verifier_reason"][anchor],
            "response": batch["response_text"][anchor],
        },
    }


def write_samples(run_dir: Path, step: int, records: Sequence[dict[str, Any]]) -> Path:
    """`<run_dir>/samples/step_<step>.jsonl`, replaced whole (a resumed run that redoes a step rewrites it)."""
    directory = Path(run_dir) / SAMPLES_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step}.jsonl"
    partial = path.with_suffix(".jsonl.partial")
    partial.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    partial.replace(path)
    return path


# ----------------------------------------------------------------------------------------------- reading


def steps_with_samples(run_dir: Path) -> list[int]:
    steps = []
    for path in (Path(run_dir) / SAMPLES_DIR).glob("step_*.jsonl"):
        number = path.stem.removeprefix("step_")
        if number.isdigit():
            steps.append(int(number))
    return sorted(steps)


def read_samples(run_dir: Path, step: int | None = None) -> tuple[int, list[dict[str, Any]]]:
    """(step, records) of `step`, or of the latest step with samples; ValueError naming what exists otherwise."""
    steps = steps_with_samples(run_dir)
    if not steps:
        raise ValueError(f"no samples in {Path(run_dir) / SAMPLES_DIR} (logger.samples_every is 0, or no step "
                         "reached it yet)")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"no samples for step {step} in {Path(run_dir) / SAMPLES_DIR}; steps with samples: "
                         f"{', '.join(map(str, steps))}")
    path = Path(run_dir) / SAMPLES_DIR / f"step_{step}.jsonl"
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON object ({err.msg})") from None
    return step, records


def shorten(text: str, max_chars: int) -> str:
    """At most about `max_chars` characters: the head and the tail (where a final answer sits), the middle cut."""
    if max_chars <= 0 or len(text) <= max_chars:
        return text
    tail = max_chars // 3
    head = max_chars - tail
    return f"{text[:head]} [... {len(text) - head - tail} characters ...] {text[-tail:]}"


def format_samples(records: Sequence[dict[str, Any]], *, kind: str | None = None, max_chars: int = 400) -> str:
    """A step's samples as text: a header with counts, then each group with its prompt (base) or anchor
    (correction) and one block per sample."""
    shown = [r for r in records if kind is None or r["kind"] == kind]
    lines = [_header(records)]
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for record in shown:
        groups.setdefault((record["kind"], record["group_id"]), []).append(record)
    for members in groups.values():
        lines += ["", *_group_lines(members, max_chars)]
    return "\n".join(lines)


def _header(records: Sequence[dict[str, Any]]) -> str:
    step = records[0]["step"] if records else "?"
    parts = []
    for kind in ("base", "correction"):
        members = [r for r in records if r["kind"] == kind]
        groups = len({r["group_id"] for r in members})
        parts.append(f"{len(members)} {kind} samples in {groups} groups")
    corrections = [r for r in records if r["kind"] == "correction"]
    if corrections:
        counts = ", ".join(f"{outcome} {sum(r['outcome'] == outcome for r in corrections)}" for outcome in OUTCOMES)
        parts[-1] += f" ({counts})"
    return f"step {step}: " + "; ".join(parts)


def _group_lines(members: list[dict[str, Any]], max_chars: int) -> list[str]:
    first = members[0]
    answer = "" if first["answer"] is None else f" | answer {first['answer']}"
    title = f"== {first['kind']} group {first['group_id']} | item {first['item_id']}{answer}"
    if first["kind"] == "correction":
        anchor = first["anchor"]
        verdict = "right" if anchor["correct"] else "wrong"
        lines = [f"{title} | anchor #{anchor['index']} ({verdict}, reward {anchor['reward']:.2f}, "
                 f"{anchor['verifier_reason']}) ==",
                 _indented("anchor: ", shorten(anchor["response"], max_chars))]
    else:
        lines = [f"{title} ==", _indented("prompt: ", shorten(first["prompt"], max_chars))]
    for record in members:
        lines += [_sample_line(record), _indented("    ", shorten(record["response"], max_chars))]
    return lines


def _sample_line(record: dict[str, Any]) -> str:
    parts = [f"  #{record['index']}"]
    if record["kind"] == "correction":
        parts.append(record["outcome"].upper().ljust(7))
    parts.append(f"reward {record['reward']:.2f} ({record['verifier_reason']})")
    if record["shaped_reward"] != record["reward"]:  # risk penalty (corrections) or overlong punishment
        parts.append(f"shaped {record['shaped_reward']:.2f}")
    parts.append(f"adv {record['advantage']:+.3f}")
    if not record["carries_gradient"]:
        parts.append("(no gradient)")
    if record["finish_reason"] is not None:
        parts.append(f"[{record['finish_reason']}]")
    return "  ".join(parts)


def _indented(label: str, text: str) -> str:
    pad = " " * len(label)
    return label + ("\n" + pad).join(text.splitlines() or [""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cipo_nemo.samples", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="the run's output directory (run.output_dir)")
    parser.add_argument("--step", type=int, default=None, help="step to show (default: the latest with samples)")
    parser.add_argument("--kind", choices=("base", "correction"), default=None, help="only this stream")
    parser.add_argument("--max-chars", type=int, default=400, help="shorten longer texts (0: print them whole)")
    args = parser.parse_args(argv)
    try:
        _, records = read_samples(args.run_dir, args.step)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        print(format_samples(records, kind=args.kind, max_chars=args.max_chars), flush=True)
    except BrokenPipeError:  # `... | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
