"""Run megatron-core 0.19.2 and megatron-bridge 0.6.2 on a CPU-only torch build (CI and development).

megatron-core's training path assumes CUDA in a handful of places: scratch buffers and grad buffers allocated on
`torch.cuda.current_device()`, literal `device="cuda"` tensors in the schedules and the optimizer, the CUDA RNG
tracker, `torch.cuda.Stream` in the DDP wrap, and type-string asserts (`param.type() == 'torch.cuda.FloatTensor'`).
`apply_cpu_compat()` patches exactly those sites (each patch names the file:line it covers, megatron-core 0.19.2
unless stated) and does nothing when CUDA is available, so GPU runs execute megatron unmodified.

The literal-device sites sit inside long functions, so instead of copying those functions a
`torch.overrides.TorchFunctionMode` rewrites `device="cuda"` to CPU and makes `Tensor.type()` report `torch.cuda.*`.
It is entered once for the process (the mode stack is per thread; megatron's CPU path runs on the calling thread)
and adds a Python hop per torch call: ~1.2 us, 20k calls (25 ms) in a SmolLM2-135M train step of ~5 s
(docs/notes/megatron_train_speed.md).

One patch is for speed, not CUDA: at data-parallel size 1 the distributed optimizer's all-gather and reduce-scatter
over the whole parameter/gradient buffer are the identity, and over gloo they cost 1.4 s per SmolLM2 step; they are
skipped for one-rank groups (`_patch_single_rank_buffer_collectives`).

Two import-time helpers are needed on any machine where they apply, CUDA or not:
- `alias_typing_override()`: megatron/training/models/{gpt,hybrid}.py:5 import `typing.override` (Python 3.12+).
- `install_lora_te_stub()`: megatron/bridge/peft/lora_layers.py:20 imports Transformer Engine unconditionally;
  when TE is not importable a stand-in module exists only while that one file executes.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.machinery
import importlib.util
import logging
import operator
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_LORA_MODULE = "megatron.bridge.peft.lora_layers"
_TE_MODULES = ("transformer_engine", "transformer_engine.pytorch")
_cpu_compat_mode: TorchFunctionMode | None = None


# ----- import-time helpers (CPU and GPU) ---------------------------------------------------------


def alias_typing_override() -> None:
    """Give Python 3.11 `typing.override` (megatron/training/models/gpt.py:5, hybrid.py:5 import it)."""
    if not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override


class TransformerEngineBroken(ImportError):
    """Transformer Engine is installed but does not import (built against another torch or CUDA, a missing library)."""


def transformer_engine_importable() -> bool:
    """True when Transformer Engine is installed and `transformer_engine.pytorch` imports (GPU installs); False when
    it is not installed. An installed TE that fails to import raises TransformerEngineBroken naming the cause:
    finding the package is not enough, and `layer_spec: auto` must not fall back to the local spec in silence."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception as err:  # an extension that fails to load raises OSError/ImportError/RuntimeError alike
        raise TransformerEngineBroken(
            f"Transformer Engine is installed ({importlib.util.find_spec('transformer_engine').origin}) but "
            f"`import transformer_engine.pytorch` fails: {type(err).__name__}: {err}"
        ) from err
    return True


class _AnyAttributeMeta(type):
    """A class whose every public attribute is another such class (stands in for TE classes and functions)."""

    def __getattr__(cls, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return _AnyAttributeMeta(name, (), {})


class _AnyAttributeModule(types.ModuleType):
    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return _AnyAttributeMeta(name, (), {})


@contextlib.contextmanager
def _transformer_engine_stand_in():
    for name in _TE_MODULES:
        module = _AnyAttributeModule(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module.__path__ = []
        sys.modules[name] = module
    sys.modules["transformer_engine"].pytorch = sys.modules["transformer_engine.pytorch"]
    try:
        yield
    finally:
        for name in _TE_MODULES:
            sys.modules.pop(name, None)


class _LoraLayersTEStandIn:
    """Meta-path finder: while megatron/bridge/peft/lora_layers.py executes, `transformer_engine` is a stand-in.

    Only that module sees it; megatron-core itself still detects TE as absent (HAVE_TE=False) and takes its
    non-TE code paths.
    """

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != _LORA_MODULE:
            return None
        spec = next(
            (
                found
                for finder in sys.meta_path
                if finder is not self and hasattr(finder, "find_spec")
                for found in [finder.find_spec(name, path, target)]
                if found is not None
            ),
            None,
        )
        if spec is None or spec.loader is None:
            return spec
        original_exec_module = spec.loader.exec_module

        def exec_module(module: types.ModuleType) -> None:
            with _transformer_engine_stand_in():
                original_exec_module(module)

        spec.loader.exec_module = exec_module
        return spec


def install_lora_te_stub() -> None:
    """Let megatron-bridge import without Transformer Engine (lora_layers.py:20). Idempotent; no-op with TE."""
    if transformer_engine_importable():
        return
    if any(isinstance(finder, _LoraLayersTEStandIn) for finder in sys.meta_path):
        return
    # megatron.core first, so that it records HAVE_TE=False before any stand-in could exist
    import megatron.core  # noqa: F401

    sys.meta_path.insert(0, _LoraLayersTEStandIn())


def prepare_megatron_imports() -> None:
    """Everything that must happen before `import megatron.bridge` / `megatron.training` (CPU and GPU)."""
    alias_typing_override()
    install_lora_te_stub()


# ----- CPU patches ---------------------------------------------------------------------------------


def apply_cpu_compat() -> None:
    """Patch megatron-core's CUDA-only sites for a CPU run. No-op when CUDA is available; idempotent."""
    global _cpu_compat_mode
    if torch.cuda.is_available() or _cpu_compat_mode is not None:
        return
    prepare_megatron_imports()
    _patch_memory_buffer()
    _patch_rng()
    _patch_device_queries()
    _patch_causal_mask()
    _patch_streams()
    _patch_single_rank_buffer_collectives()
    _cpu_compat_mode = _CudaToCpuMode()
    _cpu_compat_mode.__enter__()
    logger.info("megatron CPU compatibility applied (no CUDA): CUDA-only sites run on CPU")


def _patch_memory_buffer() -> None:
    import megatron.core.utils as megatron_utils

    # core/utils.py:715: GlobalMemoryBuffer.get_tensor allocates on torch.cuda.current_device(); every
    # core-attention forward reaches it (transformer/dot_product_attention.py)
    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        required = functools.reduce(operator.mul, tensor_shape, 1)
        buffer = self.buffer.get((name, dtype))
        if buffer is None or buffer.numel() < required:
            buffer = self.buffer[(name, dtype)] = torch.empty(required, dtype=dtype, device="cpu")
        return buffer[0:required].view(*tensor_shape)

    megatron_utils.GlobalMemoryBuffer.get_tensor = get_tensor


def _patch_rng() -> None:
    import megatron.core.tensor_parallel.random as megatron_random

    # tensor_parallel/random.py:104-170 (_get/_set_cuda_rng_state) and :303-345 (CudaRNGStatesTracker.add/fork),
    # :490 (model_parallel_cuda_manual_seed): the model-parallel RNG tracker keeps CUDA generator states; on CPU
    # it tracks the CPU generator instead
    megatron_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    megatron_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)


def _patch_device_queries() -> None:
    # pipeline_parallel/p2p_communication.py:334 (receive buffers on current_device()) and :419
    # (torch.cuda.synchronize); distributed/param_and_grad_buffer.py:1180,1186 (DDP param/grad buffers);
    # training/models/dist_utils.py:174 (model.cuda(), skipped with use_cpu_initialization but kept harmless)
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


def _patch_causal_mask() -> None:
    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.transformer.utils as transformer_utils

    # transformer/utils.py:39 builds the default causal mask with device="cuda"; the local spec's unfused softmax
    # (fusions/fused_softmax.py:327, imported by name at :8) calls it whenever attention_mask is None
    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    transformer_utils.get_default_causal_mask = get_default_causal_mask
    fused_softmax.get_default_causal_mask = get_default_causal_mask


class _NoOpStream:
    """Stands in for torch.cuda.Stream on CPU, where every op is synchronous."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any, **kwargs: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _patch_streams() -> None:
    # training/models/dist_utils.py:303-306,366 (_ddp_wrap, reached by megatron-bridge's
    # provide_distributed_model(wrap_with_ddp=True)) creates torch.cuda.Stream() and enters torch.cuda.stream(...)
    torch.cuda.Stream = _NoOpStream
    torch.cuda.current_stream = lambda *args, **kwargs: _NoOpStream()
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()


def _patch_single_rank_buffer_collectives() -> None:
    import megatron.core.distributed.param_and_grad_buffer as buffers

    # distributed/param_and_grad_buffer.py:515 (start_param_sync: all-gather of the updated parameters) and :712
    # (start_grad_sync: reduce-scatter of the gradients) run even when the distributed optimizer's group has one
    # rank (DP 1), where both are the identity: the one shard *is* the whole buffer. Gloo still pushes the whole
    # buffer through its transport: 1.4 s of a 6.5-7.1 s SmolLM2-135M train step here
    # (docs/notes/megatron_train_speed.md).
    # megatron skips the one-rank gather itself on its layer-wise path (:402), not on this one.
    buffers.dist_all_gather_func = _identity_for_one_rank(buffers.dist_all_gather_func)
    buffers.dist_reduce_scatter_func = _identity_for_one_rank(buffers.dist_reduce_scatter_func)


def _identity_for_one_rank(collective: Callable[..., Any]) -> Callable[..., Any]:
    """`collective(output, input, group=..., async_op=...)` (all-gather / reduce-scatter into a tensor), skipped
    for a synchronous call on a one-rank group: the output is the input (a reduction over one rank changes
    nothing). An asynchronous call runs the collective, since its caller waits on the work it returns."""
    if getattr(collective, "_one_rank_identity", False):
        return collective

    @functools.wraps(collective)
    def collective_unless_alone(output: torch.Tensor, input: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        group, async_op = kwargs.get("group"), kwargs.get("async_op", False)
        if args or async_op or torch.distributed.get_world_size(group) != 1:
            return collective(output, input, *args, **kwargs)
        if not _same_memory(output, input):
            output.copy_(input.view_as(output))
        return None

    collective_unless_alone._one_rank_identity = True
    return collective_unless_alone


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Both tensors are the same contiguous bytes (at DP 1 megatron's one shard is a view of the whole buffer)."""
    return (a.data_ptr() == b.data_ptr() and a.numel() == b.numel() and a.dtype == b.dtype
            and a.is_contiguous() and b.is_contiguous())


def _is_cuda_device(device: object) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # a bare int is a CUDA ordinal (torch.cuda.current_device() style)
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU and makes `Tensor.type()` report CUDA types.

    Covers: pipeline_parallel/schedules.py:749 (no-PP) and :2292 (1F1B) `torch.zeros(..., device="cuda")`;
    optimizer/optimizer.py:315,698,702, optimizer/clip_grads.py:108,112,180 and core/utils.py:1332 scratch tensors
    with device="cuda"; and the type-string asserts `param.type() == 'torch.cuda.FloatTensor'` in
    optimizer/clip_grads.py:174 and optimizer/distrib_optimizer.py:401,466,758.
    """

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            type_name = func(*args)
            return type_name if ".cuda." in type_name else type_name.replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)
