"""The contracts between the controller and the workers.

The controller (cipo_nemo/trainer.py) sees global batches and talks to a policy and a generation backend
through these two interfaces; whether a backend is one in-process object (HF, tests) or a Ray worker group
spanning many ranks (Megatron TP/PP/DP, vLLM engines) is hidden behind them.

Token layout shared by every backend (see cipo_nemo/data/batch.py): `input_ids` (N, T) holds prompt + response,
right-padded; `prompt_mask` / `response_mask` (N, T) bool; logprobs are (N, T) with
`logprobs[:, t] = log p(input_ids[:, t] | input_ids[:, :t])`, 0 at t = 0 and wherever the token is padding.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from cipo_nemo.algorithms.loss import PolicyLoss
from cipo_nemo.config.schema import GenerationConfig
from cipo_nemo.data.batch import Batch


@dataclass(frozen=True)
class SampledResponse:
    """One sampled continuation of one prompt."""

    token_ids: list[int]  # response tokens only, EOS included when generation stopped on it
    logprobs: list[float]  # sampler's log p of each response token (same length as token_ids)
    finish_reason: str  # "stop" (EOS / stop string) | "length" (max_new_tokens reached)


@dataclass(frozen=True)
class SamplingSettings:
    n: int  # samples per prompt
    max_new_tokens: int
    temperature: float  # 0 = greedy
    top_p: float
    stop_strings: tuple[str, ...]
    seed: int  # per call; the same seed and weights give the same samples
    # the call-wide index of the first prompt handed to a backend: prompt i draws from the random stream of
    # (seed, first_prompt_index + i), so an engine that gets a shard seeds each prompt as the whole call would
    first_prompt_index: int = 0

    @classmethod
    def from_config(
        cls, generation: GenerationConfig, *, n: int, seed: int, temperature: float | None = None
    ) -> SamplingSettings:
        """`generation.*` as sampling settings (trainer rollouts, validation and evaluation alike)."""
        return cls(n=n, max_new_tokens=generation.max_new_tokens,
                   temperature=generation.temperature if temperature is None else temperature,
                   top_p=generation.top_p, stop_strings=tuple(generation.stop_strings), seed=seed)


@runtime_checkable
class PolicyBackend(Protocol):
    """The trained policy: logprobs, one optimizer step per call, weights out, checkpoints."""

    def get_logprobs(self, batch: Batch) -> torch.Tensor:
        """(N, T) logprobs of `input_ids` under the current weights (no gradient)."""

    def get_reference_logprobs(self, batch: Batch) -> torch.Tensor:
        """(N, T) logprobs under the reference (initial) policy; only when policy.reference_policy != none."""

    def train(self, batch: Batch, loss_fn: PolicyLoss, *, global_denominator: float | None = None) -> dict[str, float]:
        """One optimizer step on the whole global `batch`: micro-batches (and data-parallel shards) share one
        global loss denominator, so the step does not depend on micro-batch or DP size. The denominator is
        `global_denominator` when given (the trainer's, counted with the samples it skipped), else `batch`'s own.
        Returns aggregated loss metrics plus `grad_norm` and `lr`."""

    def skip_optimizer_step(self) -> float:
        """A planned optimizer step none of whose samples carries gradient: not taken, but the learning-rate
        schedule moves on as if it had been (the schedule counts planned steps); returns that step's lr."""

    def export_hf_weights(self) -> Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]:
        """The full (TP/PP-gathered) weights under Hugging Face parameter names, cloned (never views of
        optimizer or DDP buffers)."""

    def export_hf_weights_to(self, path: Path) -> int:
        """Write export_hf_weights() as a refit file (models/refit/shm_file.py) to `path` once per node (from
        its first rank; the parent directory is created where missing); returns the tensor count. This is the refit hand-off: a file in
        /dev/shm moves weights between actors faster than Ray's object store (docs/platform.md), and every node's
        engines read their own node's copy."""

    def remove_exported_weights(self, path: Path) -> None:
        """Delete what export_hf_weights_to wrote, on every node."""

    def offload_optimizer(self) -> int:
        """Move the optimizer's own state (moments, fp32 main weights) into host memory, for a colocated engine to
        use the device's memory; returns the bytes moved over all ranks (0 where it already is there: CPU)."""

    def restore_optimizer(self) -> int:
        """Undo offload_optimizer before the next optimizer step; returns the bytes moved."""

    def send_weights(self, message: dict) -> dict | None:
        """The bucket refit's sending side (models/refit/transfer.py: ipc or broadcast, by `message`); returns
        the transfer's statistics. The engines' receiving side runs at the same time."""

    def open_refit_group(self, name: str, world_size: int, timeout_s: float) -> tuple[str, int] | None:
        """broadcast: start the refit group's store on the sending rank; its (host, port)."""

    def join_refit_group(self, group: dict) -> None:
        """broadcast: join the refit group as its sender (once per run, with every engine worker)."""

    def save_checkpoint(self, path: Path) -> None:
        """Weights + optimizer + scheduler state into `path` (a directory that does not exist yet)."""

    def load_checkpoint(self, path: Path) -> None:
        """Restore what save_checkpoint wrote, possibly at another parallel layout."""

    def save_hf(self, path: Path) -> None:
        """A Hugging Face `save_pretrained` directory of the current weights (+ tokenizer and config)."""

    def shutdown(self) -> None: ...


@runtime_checkable
class GenerationBackend(Protocol):
    """The sampler: token-id prompts in, responses with per-token logprobs out; weights refit every step."""

    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> list[list[SampledResponse]]:
        """For each prompt (token ids, chat template already applied), `settings.n` responses."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load HF-named weights; returns the number of parameters updated and raises if any engine parameter
        was left stale."""

    def update_weights_from_path(self, path: Path) -> int:
        """update_weights from a file written by PolicyBackend.export_hf_weights_to."""

    def sleep(self, *, level: int) -> None:
        """Release accelerator memory for training (colocated mode; a no-op where nothing is held). Level 1 keeps
        the weights in host memory; level 2 discards them, for when the next refit overwrites every one."""

    def wake(self, *, tags: tuple[str, ...] | None = None) -> None:
        """Undo `sleep`: all memory, or only ("weights",) (before a refit) or ("kv_cache",) (after it)."""

    def shutdown(self, *, timeout_s: float | None = None) -> None:
        """Close the engines; one still busy after `timeout_s` (None: the backend's default) is killed."""


class PendingResult(Protocol):
    """A call running elsewhere (a Ray call, a thread); `result()` waits for it and raises its error."""

    def result(self) -> object: ...


@runtime_checkable
class StreamingGeneration(Protocol):
    """A generation backend whose engines also take the bucket refits (ipc, broadcast): vLLM's."""

    @property
    def num_engine_workers(self) -> int:
        """Engine worker processes in all (one per device): the broadcast group's receivers."""

    def begin_weight_transfer(self, message: dict) -> PendingResult:
        """Start receiving one bucket refit on every engine worker; `result()`: the engine parameters updated."""

    def begin_join_refit_group(self, group: dict) -> PendingResult:
        """Start joining the broadcast refit group on every engine worker (once per run)."""


def tensor_bytes(named_tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of a weight export (for refit logs)."""
    return sum(t.numel() * t.element_size() for t in named_tensors.values())
