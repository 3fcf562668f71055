"""The in-process Hugging Face policy: small models, and the reference the Megatron policy is tested against.

Same semantics as the Megatron worker: the interfaces.py logprob alignment, micro-batches sharing one global loss
denominator, Adam with decoupled weight decay (none on biases and 1-D weights, as megatron's optimizer does),
gradient clipping on the global norm, and the same learning-rate schedule (megatron_setup.LearningRateSchedule).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from cipo_nemo.algorithms.loss import PolicyLoss, aggregate_metrics
from cipo_nemo.config.schema import OptimizerConfig, PolicyConfig
from cipo_nemo.data.batch import Batch
from cipo_nemo.data.packing import PackedRow, pack_row, restore_order
from cipo_nemo.models.policy.chunked_logprobs import full_vocab_logprobs, token_logprobs_at
from cipo_nemo.models.policy.microbatches import (
    align_logprobs,
    next_token_targets,
    plan_micro_batches,
    sorted_by_length,
    trained_positions,
)
from cipo_nemo.models.policy.optimizer_offload import OffloadsOptimizerState
from cipo_nemo.models.policy.reference import maybe_snapshot_reference, weights_swapped_in
from cipo_nemo.models.policy.megatron_setup import build_lr_scheduler, resolve_param_dtype, use_fused_adam_on_cpu
from cipo_nemo.models.refit.sender import RefitSender

CHECKPOINT_FILE = "policy.pt"


class HFPolicy(OffloadsOptimizerState, RefitSender):
    """PolicyBackend over `transformers.AutoModelForCausalLM` in this process (one device, no parallelism)."""

    def __init__(self, *, policy: PolicyConfig, num_steps: int, seed: int) -> None:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        self._policy = policy
        self._device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        # fp32 weights (Adam's master copy) with bf16 autocast, like megatron's fp32 main params
        self._autocast = (
            torch.autocast(device_type=torch.device(self._device).type, dtype=torch.bfloat16)
            if resolve_param_dtype(policy) == torch.bfloat16
            else contextlib.nullcontext()
        )
        self._model = AutoModelForCausalLM.from_pretrained(policy.model_name, dtype=torch.float32).to(self._device)
        self._optimizer = build_adamw(optimizer_cfg=policy.optimizer, model=self._model)
        self._lr_schedule = build_lr_scheduler(optimizer_cfg=policy.optimizer, num_steps=num_steps)
        self._reference_weights = maybe_snapshot_reference(policy.reference_policy, self._model.named_parameters)

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    def _named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return self._model.named_parameters()

    # ----- logprobs -----------------------------------------------------------------------------

    def get_logprobs(self, batch: Batch) -> torch.Tensor:
        """(N, T) logprobs under the current weights, in micro-batches of `logprob_micro_batch_size`."""
        self._model.eval()
        micro_batches = self._micro_batches(batch, self._policy.logprob_micro_batch_size)
        with torch.no_grad():
            parts = [self._micro_batch_logprobs(samples, row).cpu() for samples, row in micro_batches]
        if self._policy.sequence_packing:
            return restore_order(parts, [row for _, row in micro_batches])
        return torch.cat(parts)

    def _micro_batches(self, batch: Batch, micro_batch_size: int) -> list[tuple[Batch, PackedRow | None]]:
        return plan_micro_batches(batch, micro_batch_size, sequence_packing=self._policy.sequence_packing,
                                  max_total_sequence_length=self._policy.max_total_sequence_length)

    def get_reference_logprobs(self, batch: Batch) -> torch.Tensor:
        """Logprobs under the initial weights: the CPU copy is swapped in and the current weights back out."""
        if self._reference_weights is None:
            raise ValueError("reference logprobs need policy.reference_policy = cpu_copy (it is 'none')")
        with weights_swapped_in(self._model.named_parameters, self._reference_weights):
            return self.get_logprobs(batch)

    def _micro_batch_logprobs(self, micro_batch: Batch, packed_row: PackedRow | None) -> torch.Tensor:
        """(n, T) logprobs of one micro-batch; a packed one runs as a single row and is split back per sample."""
        sequence_mask = (micro_batch["prompt_mask"] | micro_batch["response_mask"]).to(self._device)
        full_length = sequence_mask.shape[1]
        if packed_row is None:
            # right padding: the causal mask alone is exact for real tokens, so trim to the longest, pass no mask
            length = int((torch.arange(full_length, device=self._device) * sequence_mask).max().item()) + 1
            input_ids, position_ids = micro_batch["input_ids"][:, :length].long().to(self._device), None
            response_mask = micro_batch["response_mask"][:, :length]
        else:
            # no attention mask and no KV cache: then transformers builds the block-diagonal causal mask from the
            # restarting position ids (masking_utils._preprocess_mask_arguments skips that when a cache exists)
            packed = pack_row(micro_batch["input_ids"], _row_within(packed_row), packed_row.num_tokens)
            input_ids, position_ids = packed.input_ids.to(self._device), packed.position_ids.to(self._device)
            response_mask = pack_row(micro_batch["response_mask"], _row_within(packed_row),
                                     packed_row.num_tokens).input_ids
        targets = next_token_targets(input_ids)
        # the loss reads response tokens only, so a training pass projects only the outputs that predict one
        positions = trained_positions(response_mask.to(self._device)) if torch.is_grad_enabled() else None
        with self._autocast:
            next_token_logprobs = self._next_token_logprobs(input_ids, position_ids, targets, positions)
        return align_logprobs(next_token_logprobs, samples=micro_batch, packed_row=packed_row, full_length=full_length)

    def _next_token_logprobs(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None, targets: torch.Tensor,
        positions: torch.Tensor | None,
    ) -> torch.Tensor:
        """(rows, S) logprobs: decoder hidden states, then lm_head + log-softmax at `positions` (None: all) in
        chunks of `logprob_chunk_tokens` tokens (chunked_logprobs.py); models whose head does more than a plain
        lm_head get their whole logits."""
        if not _plain_lm_head(self._model.config):
            logits = self._model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
            return full_vocab_logprobs(logits, targets)
        hidden = self._model.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        return token_logprobs_at(hidden.last_hidden_state, targets, positions,
                                 project=self._model.get_output_embeddings(), token_logprobs=full_vocab_logprobs,
                                 chunk_tokens=self._policy.logprob_chunk_tokens, dim=1)

    # ----- training -----------------------------------------------------------------------------

    def train(
        self, batch: Batch, loss_fn: PolicyLoss, *, global_denominator: float | None = None
    ) -> dict[str, float]:
        """One optimizer step on `batch` in micro-batches of `micro_batch_size` (or packed rows of as many tokens).

        Every micro-batch loss is divided by the denominator of the whole batch (counted here unless given), so
        the accumulated gradient is the full-batch gradient whatever the micro-batch size.
        """
        # shortest first: each micro-batch is trimmed to its own longest (packing plans its own rows)
        ordered = batch if self._policy.sequence_packing else sorted_by_length(batch)
        micro_batches = self._micro_batches(ordered, self._policy.micro_batch_size)
        if global_denominator is None:
            global_denominator = float(loss_fn.local_denominator([samples for samples, _ in micro_batches]))
        self._model.train()
        self._optimizer.zero_grad(set_to_none=True)
        lr = self._lr_schedule.apply_to(self._optimizer.param_groups)
        per_micro_batch = []
        for micro_batch, packed_row in micro_batches:
            logprobs = self._micro_batch_logprobs(micro_batch, packed_row)
            loss, metrics = loss_fn(logprobs, micro_batch, global_denominator=global_denominator)
            loss.backward()
            per_micro_batch.append(metrics)
        # clip_grad 0 = no clipping; the norm is still a metric (clip at +inf leaves gradients unchanged)
        max_norm = self._policy.optimizer.clip_grad if self._policy.optimizer.clip_grad > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self._model.parameters(), max_norm)
        self._optimizer.step()
        self._lr_schedule.step()
        return {**aggregate_metrics(per_micro_batch), "grad_norm": float(grad_norm), "lr": lr}

    def skip_optimizer_step(self) -> float:
        """The LR schedule's tick of a planned step that carries no gradient; no optimizer step (interfaces.py)."""
        lr = self._lr_schedule.lr_at(self._lr_schedule.step_count)
        self._lr_schedule.step()
        return lr

    # ----- weights ------------------------------------------------------------------------------

    def export_hf_weights(self) -> list[tuple[str, torch.Tensor]]:
        """HF-named weights, cloned to CPU; tied duplicates (e.g. a tied lm_head.weight) are left out, as
        `save_pretrained` leaves them out."""
        return [(name, tensor.detach().to("cpu", copy=True)) for name, tensor in self._untied_state()]

    def _refit_stream(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self._untied_state()

    def _untied_state(self) -> Iterator[tuple[str, torch.Tensor]]:
        tied_targets = set(getattr(self._model, "all_tied_weights_keys", None) or {})
        return ((name, tensor) for name, tensor in self._model.state_dict().items() if name not in tied_targets)

    # ----- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self, path: str | Path) -> None:
        """Model, optimizer and LR-schedule state into the new directory `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=False)
        state = {
            "model": self._model.state_dict(),
            "optimizer": self._optimizer.state_dict(),
            "lr_schedule": self._lr_schedule.state_dict(),
        }
        torch.save(state, path / CHECKPOINT_FILE)

    def load_checkpoint(self, path: str | Path) -> None:
        checkpoint_file = Path(path) / CHECKPOINT_FILE
        if not checkpoint_file.is_file():
            raise FileNotFoundError(f"no HF policy checkpoint at {checkpoint_file}")
        state = torch.load(checkpoint_file, map_location=self._device, weights_only=True)
        self._model.load_state_dict(state["model"])
        self._optimizer.load_state_dict(state["optimizer"])
        use_fused_adam_on_cpu(self._optimizer)
        self._lr_schedule.load_state_dict(state["lr_schedule"])

    def save_hf(self, path: str | Path) -> None:
        """`save_pretrained` of the current weights, with the tokenizer of `policy.tokenizer` or the model dir."""
        from transformers import AutoTokenizer

        self._model.save_pretrained(str(path))
        tokenizer_source = self._policy.tokenizer or self._policy.model_name
        AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(str(path))

    def shutdown(self) -> None:
        self._model, self._optimizer, self._reference_weights = None, None, None
        self.close_refit()


def build_adamw(*, optimizer_cfg: OptimizerConfig, model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW with the config's betas/eps/decay; biases and 1-D weights get no decay (megatron's default rule)."""
    decayed, not_decayed = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (not_decayed if parameter.ndim == 1 or name.endswith(".bias") else decayed).append(parameter)
    optimizer = torch.optim.AdamW(
        [
            {"params": decayed, "weight_decay": optimizer_cfg.weight_decay},
            {"params": not_decayed, "weight_decay": 0.0},
        ],
        lr=optimizer_cfg.lr,
        betas=(optimizer_cfg.adam_beta1, optimizer_cfg.adam_beta2),
        eps=optimizer_cfg.adam_eps,
    )
    use_fused_adam_on_cpu(optimizer)
    return optimizer


def _plain_lm_head(config: object) -> bool:
    """Whether the CausalLM's logits are exactly lm_head(last hidden state) (Llama, Qwen2/3, Mistral...);
    Gemma-style soft-capping or Cohere-style logit scaling happen in the CausalLM's forward instead."""
    return not any(getattr(config, name, None) for name in ("final_logit_softcapping", "logit_scale"))


def _row_within(row: PackedRow) -> PackedRow:
    """The row indexing its own micro-batch (`batch.select(row.indices)`) instead of the shard."""
    return PackedRow(indices=tuple(range(len(row.indices))), lengths=row.lengths)
