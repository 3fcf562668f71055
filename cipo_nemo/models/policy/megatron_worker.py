"""The Megatron policy on one rank: logprobs, train steps, weight export and checkpoints.

One `MegatronPolicyWorker` lives on every rank of an initialized torch.distributed world (a Ray worker group,
torchrun, or the gloo test harness). Axes: every method takes this rank's data-parallel shard, and all TP/PP ranks
of one DP group get the same shard; results come from the output rank of each DP group (TP rank 0 on the last
pipeline stage, `is_output_rank`), except where a method says otherwise.

Logprob convention (cipo_nemo/models/interfaces.py): `logprobs[:, t] = log p(input_ids[:, t] | input_ids[:, :t])`,
0 at t = 0 and on padding (positions outside `prompt_mask | response_mask`). Unpacked rows are right-padded, so
megatron's causal mask suffices and no attention mask is built; packed rows (`policy.sequence_packing`,
cipo_nemo/data/packing.py) carry their sample boundaries as THD `cu_seqlens` (Transformer Engine) or as a
block-diagonal causal mask (local spec).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial, wraps
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cipo_nemo.algorithms.loss import PolicyLoss, aggregate_metrics
from cipo_nemo.config.schema import PolicyConfig
from cipo_nemo.data.batch import Batch
from cipo_nemo.data.packing import (
    PackedRow,
    block_causal_mask,
    cu_seqlens,
    pack_row,
    packed_length,
    restore_order,
    round_up,
    sequence_lengths,
    sequence_pad_multiple,
)
from cipo_nemo.models.policy.chunked_logprobs import megatron_logprob_processor
from cipo_nemo.models.policy.hf_directory import write_hf_directory
from cipo_nemo.models.policy.microbatches import (
    align_logprobs,
    next_token_targets,
    plan_micro_batches,
    sorted_by_length,
    trained_positions,
)
from cipo_nemo.models.policy.optimizer_offload import OffloadsOptimizerState
from cipo_nemo.models.policy.reference import maybe_snapshot_reference, weights_swapped_in
from cipo_nemo.models.policy.megatron_setup import (
    build_lr_scheduler,
    build_megatron_model,
    build_optimizer,
    init_parallel_state,
    use_fused_adam_on_cpu,
)
from cipo_nemo.models.refit.manifest import detach_for_transfer
from cipo_nemo.models.refit.sender import RefitSender

# dist_checkpointing metadata, as megatron's trainer writes with --dist-ckpt-optim-fully-reshardable: the
# distributed optimizer's state is stored per parameter, so a checkpoint loads at any TP/PP/DP layout
FULLY_RESHARDABLE = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "singleton_local_shards": False,
    "chained_optim_avoid_prefix": True,
}


@dataclass
class _MicroBatch:
    """One micro-batch as the model sees it; `samples` are the real rows (for the loss), the rest is padding."""

    samples: Batch
    input_ids: torch.Tensor  # (rows, S); rows >= len(samples) unpacked, 1 packed
    position_ids: torch.Tensor  # (rows, S)
    full_length: int  # the batch's T: logprobs are right-padded back to it
    response_mask: torch.Tensor  # (rows, S) bool, laid out like input_ids: the tokens a training pass scores
    packed_row: PackedRow | None = None  # which samples the single packed row holds, and their lengths
    attention_mask: torch.Tensor | None = None  # packed, local spec: (1, 1, S, S) block-diagonal, True = masked
    packed_seq_params: Any = None  # packed, Transformer Engine: megatron's PackedSeqParams (THD)


def _returns_cached_memory(method: Callable) -> Callable:
    """Run `method`, then hand the blocks PyTorch's allocator keeps cached back to the device (empty_cache).

    A colocated vLLM engine is another process: it can wake into memory this process has released, not into
    blocks its allocator merely holds free. So every phase that precedes the engine's turn (logprobs, train,
    the refit export, a checkpoint load) ends with this, as NeMo-RL's workers do."""

    @wraps(method)
    def releasing(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        finally:
            release_cached_memory()

    return releasing


def release_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class MegatronPolicyWorker(OffloadsOptimizerState, RefitSender):
    """One rank of the Megatron policy (see the module docstring for the data and output conventions)."""

    def __init__(self, *, policy: PolicyConfig, num_steps: int, seed: int) -> None:
        self._policy = policy
        self._owns_process_group = init_parallel_state(megatron_cfg=policy.megatron, seed=seed)
        model = build_megatron_model(policy_cfg=policy)
        self._bridge, self._chunks, self._layer_spec = model.bridge, model.chunks, model.layer_spec
        self._optimizer = build_optimizer(optimizer_cfg=policy.optimizer, model=model)
        _use_fused_cpu_adams(self._optimizer)
        self._lr_schedule = build_lr_scheduler(optimizer_cfg=policy.optimizer, num_steps=num_steps)
        self._reference_weights = maybe_snapshot_reference(policy.reference_policy, self._named_parameters)

    # ----- placement ----------------------------------------------------------------------------

    @property
    def dp_rank(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_rank()

    @property
    def dp_size(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_world_size()

    @property
    def is_output_rank(self) -> bool:
        """TP rank 0 on the last pipeline stage: the rank whose return values the controller keeps."""
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.is_pipeline_last_stage()

    def parallel_info(self) -> dict[str, int | bool]:
        """dp_rank, dp_size and is_output_rank in one call (the Ray facade routes shards and results with them)."""
        return {"dp_rank": self.dp_rank, "dp_size": self.dp_size, "is_output_rank": self.is_output_rank}

    # ----- logprobs -----------------------------------------------------------------------------

    @_returns_cached_memory
    def get_logprobs(self, batch: Batch) -> torch.Tensor | None:
        """(N, T) logprobs of this rank's shard under the current weights; None on non-output ranks."""
        micro_batches = self._build_micro_batches(batch, self._policy.logprob_micro_batch_size)
        for chunk in self._chunks:
            chunk.eval()
        with torch.no_grad():
            outputs = self._run_schedule(micro_batches, self._collect_logprobs, forward_only=True)
        if not self.is_output_rank:
            return None
        parts = [output["logprobs"] for output in outputs]
        if self._policy.sequence_packing:
            return restore_order(parts, [micro_batch.packed_row for micro_batch in micro_batches])
        return torch.cat(parts)

    def get_reference_logprobs(self, batch: Batch) -> torch.Tensor | None:
        """Logprobs under the initial weights (`reference_policy: cpu_copy`).

        NeMo-RL's choice: a CPU copy of the initial weights is swapped into the live model (in-place copies, so
        DDP buffers and optimizer views stay valid), the logprobs are computed, and the current weights are
        swapped back. It costs two host copies per call instead of a second resident model.
        """
        if self._reference_weights is None:
            raise ValueError("reference logprobs need policy.reference_policy = cpu_copy (it is 'none')")
        with weights_swapped_in(self._named_parameters, self._reference_weights):
            return self.get_logprobs(batch)

    def _collect_logprobs(
        self, micro_batch: _MicroBatch, output: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logprobs = self._token_logprobs(output, micro_batch)
        return logprobs.new_zeros(()), {"logprobs": logprobs.detach().cpu()}

    def _token_logprobs(self, next_token_logprobs: torch.Tensor, micro_batch: _MicroBatch) -> torch.Tensor:
        """(n_real, T) logprobs from the model's (rows, S) next-token ones (`megatron_logprob_processor`: vocab
        shards never gathered, fp32 logits one chunk at a time), per the module's alignment; a packed row is split
        back into its samples."""
        return align_logprobs(next_token_logprobs, samples=micro_batch.samples, packed_row=micro_batch.packed_row,
                              full_length=micro_batch.full_length)

    # ----- training -----------------------------------------------------------------------------

    @_returns_cached_memory
    def train(self, batch: Batch, loss_fn: PolicyLoss, *, global_denominator: float) -> dict[str, float]:
        """One optimizer step on this rank's shard; returns the global step's metrics on every rank.

        Each micro-batch loss is `loss_fn(..., global_denominator=...)`, already a share of the full-batch loss.
        megatron divides every micro-batch loss by the number of micro-batches (forward_step_calc_loss in
        pipeline_parallel/schedules.py) and DDP pre-scales gradients by 1/DP before summing them over DP
        (gradient_scaling_factor in distributed/distributed_data_parallel.py); scaling the loss by both undoes
        that, so the gradient is the sum over all micro-batches of all DP ranks: the full-batch gradient.
        """
        micro_batches = self._build_micro_batches(self._length_grouped(batch), self._policy.micro_batch_size)
        loss_scale = len(micro_batches) * self.dp_size
        for chunk in self._chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        self._optimizer.zero_grad()
        lr = self._lr_schedule.apply_to(self._optimizer.param_groups)

        def micro_batch_loss(micro_batch: _MicroBatch, output: torch.Tensor) -> tuple[torch.Tensor, dict]:
            logprobs = self._token_logprobs(output, micro_batch)
            loss, metrics = loss_fn(logprobs, micro_batch.samples, global_denominator=global_denominator)
            return loss * loss_scale, metrics

        per_micro_batch = self._run_schedule(micro_batches, micro_batch_loss, forward_only=False)
        _, grad_norm, _ = self._optimizer.step()
        self._lr_schedule.step()
        metrics = self._global_metrics(per_micro_batch)
        return {**metrics, "grad_norm": float(grad_norm), "lr": lr}

    def skip_optimizer_step(self) -> float:
        """The LR schedule's tick of a planned step that carries no gradient; no optimizer step (interfaces.py).
        Every rank ticks its own copy of the schedule, so they stay in step."""
        lr = self._lr_schedule.lr_at(self._lr_schedule.step_count)
        self._lr_schedule.step()
        return lr

    def _global_metrics(self, per_micro_batch: list[dict[str, float]]) -> dict[str, float]:
        """Loss metrics over all micro-batches and DP ranks, on every rank (they exist on the last stage only)."""
        from megatron.core import parallel_state

        aggregated: list[dict[str, float] | None] = [None]
        if parallel_state.is_pipeline_last_stage():
            per_rank: list[dict[str, float]] = [{} for _ in range(self.dp_size)]
            dist.all_gather_object(
                per_rank, aggregate_metrics(per_micro_batch), group=parallel_state.get_data_parallel_group()
            )
            aggregated = [aggregate_metrics(per_rank)]
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast_object_list(
                aggregated,
                src=parallel_state.get_pipeline_model_parallel_last_rank(),
                group=parallel_state.get_pipeline_model_parallel_group(),
            )
        assert aggregated[0] is not None
        return aggregated[0]

    # ----- the schedule -------------------------------------------------------------------------

    def _run_schedule(
        self,
        micro_batches: list[_MicroBatch],
        loss_func: Callable[[_MicroBatch, torch.Tensor], tuple[torch.Tensor, dict]],
        *,
        forward_only: bool,
    ) -> list[dict]:
        """megatron's (pipelined) forward(-backward) schedule; returns loss_func's dicts on the last stage."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        logprob_processor = megatron_logprob_processor(self._policy.logprob_chunk_tokens)

        def forward_step(data_iterator: Iterator[_MicroBatch], model: Any) -> tuple[torch.Tensor, Callable]:
            micro_batch = next(data_iterator)
            # the loss reads response tokens only, so a training pass projects only the outputs that predict one
            positions = None if forward_only else trained_positions(micro_batch.response_mask)
            # later pipeline stages ignore input_ids and take the previous stage's activations
            output = model(input_ids=micro_batch.input_ids, position_ids=micro_batch.position_ids,
                           attention_mask=micro_batch.attention_mask, packed_seq_params=micro_batch.packed_seq_params,
                           output_processor=logprob_processor,
                           output_processor_context=(next_token_targets(micro_batch.input_ids), positions))
            return output, partial(loss_func, micro_batch)

        rows, seq_length = micro_batches[0].input_ids.shape
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=self._chunks,
            num_microbatches=len(micro_batches),
            seq_length=seq_length,
            micro_batch_size=rows,
            forward_only=forward_only,
        )

    def _length_grouped(self, batch: Batch) -> Batch:
        """A training shard shortest first (`sorted_by_length`) where micro-batches are trimmed one by one: not
        under PP (every micro-batch has the shard's shape) nor with packing (which plans its own rows)."""
        from megatron.core import parallel_state

        if self._policy.sequence_packing or parallel_state.get_pipeline_model_parallel_world_size() > 1:
            return batch
        return sorted_by_length(batch)

    def _build_micro_batches(self, batch: Batch, micro_batch_size: int) -> list[_MicroBatch]:
        """Micro-batches trimmed to their longest sequence (rounded up to `sequence_pad_multiple`); under PP
        (fixed p2p shapes) all to the shard's longest and padded to full rows.
        With sequence packing, packed rows of `micro_batch_size x max_total_sequence_length` tokens instead."""
        from megatron.core import parallel_state

        if len(batch) == 0:
            raise ValueError("the policy got an empty data-parallel shard; every DP rank needs >= 1 sample")
        planned = plan_micro_batches(batch, micro_batch_size, sequence_packing=self._policy.sequence_packing,
                                     max_total_sequence_length=self._policy.max_total_sequence_length)
        if self._policy.sequence_packing:
            return self._build_packed_micro_batches(batch, planned)
        full_length = batch["input_ids"].shape[1]
        pad_rows = parallel_state.get_pipeline_model_parallel_world_size() > 1
        micro_batches = []
        for samples, _ in planned:
            rows = micro_batch_size if pad_rows else len(samples)
            length = round_up(max(sequence_lengths(batch if pad_rows else samples)), self._sequence_pad_multiple())
            positions = torch.arange(length)

            def laid_out(key: str) -> torch.Tensor:  # (rows, length): trimmed or padded with 0, padding rows
                columns = samples[key][:, :length].long()
                return _pad_rows(F.pad(columns, (0, length - columns.shape[1])), rows)

            micro_batches.append(
                _MicroBatch(
                    samples=samples,
                    input_ids=laid_out("input_ids").to(_device()),
                    position_ids=positions.expand(rows, length).to(_device()),
                    full_length=full_length,
                    response_mask=laid_out("response_mask").bool().to(_device()),
                )
            )
        return micro_batches

    def _sequence_pad_multiple(self) -> int:
        from megatron.core import parallel_state

        megatron = self._policy.megatron
        return sequence_pad_multiple(parallel_state.get_tensor_model_parallel_world_size(), megatron.fp8,
                                     megatron.fp8_recipe)

    def _build_packed_micro_batches(
        self, batch: Batch, planned: list[tuple[Batch, PackedRow | None]]
    ) -> list[_MicroBatch]:
        """One packed row per micro-batch; every row the same length under PP, a multiple of
        `sequence_pad_multiple` (TP, times TE's FP8 token multiple with FP8 on)."""
        from megatron.core import parallel_state

        rows = [row for _, row in planned]
        lengths = packed_length(
            rows,
            multiple=self._sequence_pad_multiple(),
            uniform=parallel_state.get_pipeline_model_parallel_world_size() > 1,
        )
        micro_batches = []
        for (samples, row), length in zip(planned, lengths):
            packed = pack_row(batch["input_ids"], row, length)
            micro_batch = _MicroBatch(
                samples=samples,
                input_ids=packed.input_ids.to(_device()),
                position_ids=packed.position_ids.to(_device()),
                full_length=batch["input_ids"].shape[1],
                response_mask=pack_row(batch["response_mask"], row, length).input_ids.bool().to(_device()),
                packed_row=row,
            )
            if self._layer_spec == "transformer_engine":
                micro_batch.packed_seq_params = _thd_params(row, length)
            else:
                # the local spec's attention takes no PackedSeqParams (dot_product_attention.py asserts it); the
                # mask gives the same attention: RoPE scores depend on q - k only, which packing leaves unchanged
                micro_batch.attention_mask = block_causal_mask(packed.segment_ids).to(_device())
            micro_batches.append(micro_batch)
        return micro_batches

    # ----- weights ------------------------------------------------------------------------------

    def _named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        for index, chunk in enumerate(self._chunks):
            for name, parameter in chunk.named_parameters():
                yield f"{index}.{name}", parameter

    def export_hf_weights(self) -> dict[str, torch.Tensor] | None:
        """Full (TP/PP-gathered) HF-named weights, cloned, on global rank 0; None elsewhere. Collective.

        Clones because the bridge yields views into DDP's contiguous parameter buffer, and serializing a view
        ships the whole buffer (docs/platform.md). A tied output layer is not emitted (HF does not store it either).
        """
        keep = dist.get_rank() == 0
        weights = self._gathered_hf_weights(keep=keep)
        return weights if keep else None

    def _gathered_hf_weights(self, *, keep: bool) -> dict[str, torch.Tensor]:
        """Every rank takes part in the bridge's gather (it is collective); only a `keep` rank copies each full
        tensor to host memory (one owning copy: the bridge yields views into DDP's buffer). The others drop each
        tensor on the device as soon as the next one is gathered: at 70B that is 140 GB of device-to-host copies
        per rank per step not made on the ranks that write no file."""
        weights: dict[str, torch.Tensor] = {}
        for name, tensor in self._bridge.export_hf_weights(self._chunks, cpu=False, show_progress=False):
            if keep:
                weights[name] = detach_for_transfer(tensor)
        return weights

    def _refit_stream(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The HF-named weights for a refit (models/refit/sender.py): megatron-bridge's gather is collective and
        gives every rank the full tensors (stream_weights_megatron_to_hf)."""
        return self._bridge.export_hf_weights(self._chunks, cpu=False, show_progress=False)

    # ----- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self, path: str | Path) -> None:
        """Weights, optimizer and LR-schedule state with megatron dist_checkpointing into a new directory `path`.
        Collective; `path` must be on a filesystem every rank sees."""
        from megatron.core import dist_checkpointing

        path = Path(path)
        if path.exists():
            raise FileExistsError(f"checkpoint directory {path} already exists; save into a new directory")
        dist.barrier()
        if dist.get_rank() == 0:
            path.mkdir(parents=True)
        dist.barrier()
        dist_checkpointing.save(self._sharded_state_dict(is_loading=False), str(path))
        dist.barrier()

    @_returns_cached_memory
    def load_checkpoint(self, path: str | Path) -> None:
        """Restore what save_checkpoint wrote, at this worker's TP/PP/DP layout (any layout can load it)."""
        from megatron.core import dist_checkpointing

        if not Path(path).is_dir():
            raise FileNotFoundError(f"checkpoint directory {path} does not exist")
        state = dist_checkpointing.load(self._sharded_state_dict(is_loading=True), str(path))
        self._unwrapped_model().load_state_dict(state["model"])
        with _torch_adam_step_set_aside(self._optimizer):
            self._optimizer.load_state_dict(state["optimizer"])
        _use_fused_cpu_adams(self._optimizer)  # the load replaced the param groups, flag included
        self._lr_schedule.load_state_dict(state["lr_schedule"])

    def _unwrapped_model(self) -> Any:
        """The GPTModel inside DDP (and Float16Module): checkpoints use its parameter names, as megatron's do."""
        from megatron.core.utils import unwrap_model

        if len(self._chunks) != 1:
            raise NotImplementedError("checkpoints of virtual-pipeline models (several chunks) are not supported")
        return unwrap_model(self._chunks[0])

    def _sharded_state_dict(self, *, is_loading: bool) -> dict[str, Any]:
        from megatron.core import parallel_state

        _fill_empty_torch_adam_state(self._optimizer)
        metadata = {
            **FULLY_RESHARDABLE,
            "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True),
        }
        model_state = self._unwrapped_model().sharded_state_dict(metadata=metadata)
        return {
            "model": model_state,
            "optimizer": self._optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=metadata),
            "lr_schedule": self._lr_schedule.state_dict(),
        }

    def save_hf(self, path: str | Path) -> None:
        """A Hugging Face checkpoint directory of the current weights (hf_directory.py), written by rank 0.
        Collective."""
        weights = self.export_hf_weights()
        if weights is not None:
            write_hf_directory(Path(path), weights, bridge=self._bridge, tokenizer=self._policy.tokenizer)
        dist.barrier()

    def shutdown(self) -> None:
        """Drop the model and optimizer, destroy megatron's groups and, if this worker created it, the world."""
        from megatron.core import parallel_state

        self._chunks, self._optimizer, self._reference_weights = [], None, None
        self.close_refit()
        parallel_state.destroy_model_parallel()
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


# ----- megatron-core 0.19.2 with torch's Adam (no Apex / TE fused Adam: CPU, or a GPU install without TE) -----


def _torch_adams(optimizer: Any) -> Iterator[tuple[Any, torch.optim.Optimizer]]:
    """(megatron optimizer, inner torch Adam) pairs; fused TE/Apex Adams keep `step` per group and need nothing."""
    for megatron_optimizer in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = megatron_optimizer.optimizer
        if isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            yield megatron_optimizer, inner


def _use_fused_cpu_adams(optimizer: Any) -> None:
    for _, inner in _torch_adams(optimizer):
        use_fused_adam_on_cpu(inner)


def _fill_empty_torch_adam_state(optimizer: Any) -> None:
    """Give a never-stepped torch Adam the state its first step would create (step 0, zero moments).

    The distributed optimizer's state_dict reads `step` from every parameter's state (optimizer/distrib_optimizer.py:839
    asserts one common step), so a fresh optimizer can neither be saved nor be the template a checkpoint loads
    into. Training from this state is identical to torch's lazy init."""
    for _, inner in _torch_adams(optimizer):
        for group in inner.param_groups:
            for parameter in group["params"]:
                if not inner.state[parameter]:
                    inner.state[parameter] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(parameter),
                        "exp_avg_sq": torch.zeros_like(parameter),
                    }


@contextlib.contextmanager
def _torch_adam_step_set_aside(optimizer: Any) -> Iterator[None]:
    """Work around two bugs of DistributedOptimizer.load_state_dict with torch's Adam.

    1. The per-parameter copy (_set_main_param_and_optimizer_states, distrib_optimizer.py:1218-1225) copies every
       tensor of the optimizer state from the checkpoint's tensors, which never hold `step` (it is stored once,
       in the param groups): KeyError 'step'. The step is set aside while each parameter is copied.
    2. It gives every parameter the same `step` tensor object (distrib_optimizer.py:1027-1033); torch's Adam
       increments each parameter's step in place, so the shared counter would advance once per parameter per
       step and corrupt Adam's bias correction. Each parameter gets its own copy afterwards.
    """
    patched = []
    for megatron_optimizer, inner in _torch_adams(optimizer):
        copy_states = getattr(megatron_optimizer, "_set_main_param_and_optimizer_states", None)
        if copy_states is None:
            continue

        def copy_without_step(model_param, tensors, *, _owner=megatron_optimizer, _inner=inner, _copy=copy_states):
            group_index, group_order = _owner.model_param_group_index_map[model_param]
            state = _inner.state[_inner.param_groups[group_index]["params"][group_order]]
            step = state.pop("step", None)
            try:
                _copy(model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step

        megatron_optimizer._set_main_param_and_optimizer_states = copy_without_step
        patched.append(megatron_optimizer)
    try:
        yield
    finally:
        for megatron_optimizer in patched:
            del megatron_optimizer._set_main_param_and_optimizer_states
        for _, inner in _torch_adams(optimizer):
            for state in inner.state.values():
                if "step" in state:
                    state["step"] = state["step"].clone()


def _device() -> torch.device | str:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"


def _thd_params(row: PackedRow, length: int) -> Any:
    """megatron's PackedSeqParams for one THD row: the same boundaries for queries and keys (self-attention)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    boundaries = cu_seqlens(row, length).to(_device())
    longest = int((boundaries[1:] - boundaries[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=boundaries, cu_seqlens_kv=boundaries,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Append zero rows up to `rows` (pipeline stages exchange fixed-shape activations)."""
    if tensor.shape[0] == rows:
        return tensor
    return torch.cat([tensor, tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))])
