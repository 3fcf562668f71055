"""transformers `generate` backend: the small-model fallback behind the same `GenerationBackend` contract.

Each prompt is generated on its own (its n samples as one batch via `num_return_sequences`) under its own seed:
left-padding several prompts into one batch would make a sample depend on which other prompts share its call.
Logprobs come from `output_logits` (the model's raw logits, before temperature / top-p), so they are the
temperature-1 logprobs the trainer recomputes. EOS ids come from generation_config.json (see the package doc).

Stop strings are matched after generation on the decoded response only (special tokens skipped), as vLLM does,
rather than with transformers' `stop_strings`: its criterion also matches strings that begin inside the prompt,
and it would end a row without an EOS, so the row's padding could not be told from sampled tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers import GenerationConfig as HFGenerationConfig

from cipo_nemo.config.schema import GenerationConfig
from cipo_nemo.models.generation import find_stop_string_end, prompt_seed, read_eos_token_ids
from cipo_nemo.models.interfaces import SampledResponse, SamplingSettings
from cipo_nemo.models.refit.manifest import build_weight_manifest
from cipo_nemo.models.refit.shm_file import load_refit_file

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFGeneration:
    """`GenerationBackend` over a transformers causal LM held in this process."""

    def __init__(self, *, model_dir: str, generation: GenerationConfig, max_model_len: int, seed: int):
        del seed  # every generate() call is seeded by its settings; kept for the backends' common signature
        self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = resolve_model_dtype(generation.vllm.dtype)
        self._model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(self._device).eval()
        self._tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self._eos_token_ids = read_eos_token_ids(model_dir)
        pad = self._tokenizer.pad_token_id
        self._pad_token_id = pad if pad is not None else self._eos_token_ids[0]
        self._max_model_len = max_model_len
        self._manifest = build_weight_manifest(
            parameter_names=[name for name, _ in self._model.named_parameters()],
            packed_modules={},
            tie_word_embeddings=bool(self._model.config.tie_word_embeddings),
        )

    @property
    def num_engine_parameters(self) -> int:
        return self._manifest.num_parameters

    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> list[list[SampledResponse]]:
        return [
            self._generate_for_prompt(prompt, settings, prompt_seed(settings, index))
            for index, prompt in enumerate(prompts)
        ]

    def _generate_for_prompt(self, prompt: list[int], settings: SamplingSettings, seed: int) -> list[SampledResponse]:
        max_new_tokens = min(settings.max_new_tokens, self._max_model_len - len(prompt))
        if max_new_tokens < 1:
            raise ValueError(
                f"a prompt has {len(prompt)} tokens; it must be shorter than max_model_len ({self._max_model_len})"
            )
        greedy = settings.temperature == 0
        config = self._build_generation_config(settings, max_new_tokens=max_new_tokens, greedy=greedy)
        input_ids = torch.tensor([prompt], device=self._device)
        rng_devices = [self._device] if self._device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices), torch.no_grad():  # leave the caller's RNG state alone
            torch.manual_seed(seed)
            output = self._model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config
            )
        responses = output.sequences[:, len(prompt) :]  # (R, L)
        logprobs = sampled_token_logprobs(output.logits, responses)  # (R, L)
        samples = [
            self._finish_sample(tokens.tolist(), row_logprobs.tolist(), settings)
            for tokens, row_logprobs in zip(responses, logprobs, strict=True)
        ]
        return samples * settings.n if greedy else samples  # greedy samples are identical: decode once

    def _build_generation_config(
        self, settings: SamplingSettings, *, max_new_tokens: int, greedy: bool
    ) -> HFGenerationConfig:
        # top_k 0 is off, as in vLLM (transformers may otherwise fill in its default of 50).
        sampling = {} if greedy else {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0}
        return HFGenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=not greedy,
            num_return_sequences=1 if greedy else settings.n,
            eos_token_id=list(self._eos_token_ids),
            pad_token_id=self._pad_token_id,
            return_dict_in_generate=True,
            output_logits=True,
            **sampling,
        )

    def _finish_sample(self, tokens: list[int], logprobs: list[float], settings: SamplingSettings) -> SampledResponse:
        """Cut a generated row at its first EOS (kept) or stop string, whichever ends first; the rest is padding."""
        eos_positions = [i for i, token in enumerate(tokens) if token in self._eos_token_ids]
        end = eos_positions[0] + 1 if eos_positions else len(tokens)
        decode = lambda ids: self._tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        stop_end = find_stop_string_end(tokens[:end], settings.stop_strings, decode)
        if stop_end is not None:
            end = stop_end
        reason = "stop" if eos_positions or stop_end is not None else "length"
        return SampledResponse(token_ids=tokens[:end], logprobs=logprobs[:end], finish_reason=reason)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor]) -> int:
        """Copy HF-named tensors into the model; every parameter must be given (a tied lm_head may be omitted)."""
        named = dict(named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors)
        self._manifest.check_names(named)
        with torch.no_grad():
            for name, parameter in self._model.named_parameters():
                tensor = named[name]
                if tensor.shape != parameter.shape:
                    raise ValueError(
                        f"refit tensor {name} has shape {tuple(tensor.shape)}, the model's is {tuple(parameter.shape)}"
                    )
                parameter.copy_(tensor)
        return self._manifest.num_parameters

    def update_weights_from_path(self, path: str | Path) -> int:
        return self.update_weights(load_refit_file(path))

    def sleep(self, *, level: int) -> None:
        """No-op: the HF fallback keeps its weights where they are."""

    def wake(self, *, tags: tuple[str, ...] | None = None) -> None:
        """No-op, see `sleep`."""

    def shutdown(self, *, timeout_s: float | None = None) -> None:
        del timeout_s  # nothing runs outside the caller's thread to wait for
        self._model = None


def resolve_model_dtype(dtype: str) -> torch.dtype:
    """`generation.vllm.dtype` applies to this backend too: "auto" is float32 on CPU and bfloat16 on GPU."""
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return _TORCH_DTYPES[dtype]


def sampled_token_logprobs(step_logits: tuple[torch.Tensor, ...], tokens: torch.Tensor) -> torch.Tensor:
    """(R, L) raw log-probabilities of `tokens` (R, L) from the per-step logits [(R, V)] * L, one step at a time
    so that no (R, L, V) fp32 tensor is built."""
    columns = [
        torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, step, None]).squeeze(-1)
        for step, logits in enumerate(step_logits)
    ]
    return torch.stack(columns, dim=1)
