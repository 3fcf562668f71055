"""Launch plan: the config resolved against the cluster it will run on, checked before anything starts.

The preflight builds it for every run and `python -m cipo_nemo --dry-run` prints it. It answers four questions:

1. Does the parallel layout fit? world = num_nodes x devices_per_node GPUs, DP = world / (TP x PP) must be whole,
   and the model must split the way megatron-core and vLLM split it (heads and KV heads by TP, layers by PP,
   vocab by TP). Each rule is checked here with the error megatron / vLLM / this loop would raise minutes into the
   job, naming the config keys to change.
2. Where does everything sit? Policy ranks, vLLM engines, colocated or apart (each side's devices and memory).
3. How much work is one step? Rollouts (base + the most corrections) and token upper bounds.
4. Does one GPU hold it? A per-GPU memory estimate against `cluster.gpu_memory_gib`.
5. What does the refit cost? Per transport (file, ipc, broadcast; refit.transport picks one): what moves where,
   the buffers it holds, a time at stated rates with their sources (models/refit/cost.py), and, for the file,
   whether this machine's /dev/shm and host memory hold it.

The memory figures are an ESTIMATE from the model's shape, not a measurement. Assumptions (each also a constant
or a one-line formula below): Llama/Qwen-style decoder (RMSNorm, GQA, SwiGLU MLP, no dropout); bf16 weights with
megatron's fp32 gradient buffer (`grad_reduce_in_fp32=True` in megatron_setup.py) and fp32 main weights + two Adam
moments in the optimizer, sharded over DP by the distributed optimizer; activations after Korthikanti et al. 2022
("Reducing Activation Recomputation in Large Transformer Models") adapted to GQA/SwiGLU, with flash attention
(no s^2 term) for the Transformer Engine spec and an unfused s^2 term for the local spec; every sample as long
as `policy.max_total_sequence_length`; 1F1B keeps min(PP, micro-batches) micro-batches in flight on the first
stage; colocated vLLM takes `gpu_memory_utilization x gpu_memory_gib` while awake and sleeps at level 2 (weights
discarded, KV cache freed) while the policy computes logprobs and trains; the policy keeps its weights and gradients
on the GPU during generation, and its optimizer state unless `policy.offload_optimizer_for_generation` moves that to
host memory from the end of train to the next optimizer step (auto: when the peak does not fit otherwise), and
returns its freed activation blocks (`empty_cache` after logprobs, train and export); with the file the refit
exports while vLLM sleeps (one full gathered tensor at a time on every rank), then vLLM wakes its weights only,
reloads, and wakes its KV cache last; with buckets (ipc, broadcast) vLLM's weights wake first and the gathered
tensor and the buckets sit beside them. Fixed overheads (CUDA contexts, NCCL, fragmentation) are rough. The
refit's times use stated rates, published or ours, not measurements of this job.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from cipo_nemo.config import ConfigError, MasterConfig
from cipo_nemo.models.fp8_settings import check_precision, engine_fp8_scaling
from cipo_nemo.models.refit.cost import RefitEstimate, check_refit_host, estimate_refit_cost, refit_lines
from cipo_nemo.models.refit.layout import MIB, resolve_transport
from cipo_nemo.models.shapes import ModelShape, find_model_shape, format_params

GIB = 2**30
PROCESS_OVERHEAD_GIB = 2.0  # policy process: CUDA context, NCCL buffers, allocator fragmentation
VLLM_ASLEEP_GIB = 1.0  # a sleeping (level 1) vLLM engine keeps its CUDA context and a few buffers on the GPU
VLLM_RESERVE_GIB = 2.0  # inside vLLM's share: its profiled activation peak and sampler buffers (no CUDA graphs)
LOGIT_BYTES_TRAIN = 10  # per logit: bf16 output + fp32 copy + fp32 softmax kept for backward (vocab-parallel CE)
LOGIT_BYTES_FORWARD = 6  # per logit in the logprob pass: bf16 output + fp32 copy
FP8_WEIGHT_BYTES = 2  # per parameter with TE FP8: the FP8 copy of each weight and of its transpose
TEMPLATE_TOKENS = 100  # correction template text around the problem and the quoted attempt (rough)


class LayoutError(ConfigError):
    """The config does not fit its cluster or its model; one line per broken rule, naming the keys to change."""


# ----------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    num_nodes: int
    devices_per_node: int
    tensor_parallel: int
    pipeline_parallel: int
    vllm_tensor_parallel: int
    generation_devices_per_node: int | None = None  # the engines' own devices per node; None: the policy's

    @property
    def world(self) -> int:
        return self.num_nodes * self.devices_per_node

    @property
    def engine_devices_per_node(self) -> int:
        return self.generation_devices_per_node or self.devices_per_node

    @property
    def data_parallel(self) -> int:
        return self.world // (self.tensor_parallel * self.pipeline_parallel)  # DP = world / (TP * PP)

    @property
    def vllm_engines(self) -> int:
        return self.num_nodes * self.engine_devices_per_node // self.vllm_tensor_parallel


def layout_of(cfg: MasterConfig) -> Layout:
    megatron = cfg.policy.backend == "megatron"  # the HF policy is one process: no model parallelism
    return Layout(
        num_nodes=cfg.cluster.num_nodes,
        devices_per_node=cfg.cluster.devices_per_node,
        tensor_parallel=cfg.policy.megatron.tensor_parallel if megatron else 1,
        pipeline_parallel=cfg.policy.megatron.pipeline_parallel if megatron else 1,
        vllm_tensor_parallel=cfg.generation.vllm.tensor_parallel,
        generation_devices_per_node=None if cfg.generation.colocated else cfg.cluster.generation_devices_per_node,
    )


def _fits_heads(heads: int, kv_heads: int, tp: int) -> list[str]:
    """Why `tp` cannot split these heads ([] when it can); KV heads may also be replicated (TP a multiple)."""
    problems = []
    if heads % tp:
        problems.append(f"the model's {heads} attention heads are not divisible by {{key}} ({tp})")
    if kv_heads % tp and tp % kv_heads:
        problems.append(f"the model's {kv_heads} KV heads are neither a multiple nor a divisor of {{key}} ({tp})")
    return problems


def check_cluster(cfg: MasterConfig, layout: Layout) -> list[str]:
    """TP x PP must tile the cluster's GPUs into whole data-parallel replicas."""
    model_parallel = layout.tensor_parallel * layout.pipeline_parallel
    if cfg.policy.backend != "megatron" or layout.world % model_parallel == 0:
        return []
    return [f"policy.megatron.tensor_parallel x pipeline_parallel = {layout.tensor_parallel} x "
            f"{layout.pipeline_parallel} = {model_parallel} does not divide the {layout.world} GPUs "
            f"(cluster.num_nodes x cluster.devices_per_node = {layout.num_nodes} x {layout.devices_per_node}): "
            "data parallel = GPUs / (TP x PP) must be a whole number"]


def check_model_split(cfg: MasterConfig, shape: ModelShape, layout: Layout) -> list[str]:
    """The splits megatron-core checks when it builds the model (transformer_config.py, tensor_parallel/utils.py)."""
    if cfg.policy.backend != "megatron":
        return []
    tp, pp, megatron = layout.tensor_parallel, layout.pipeline_parallel, cfg.policy.megatron
    problems = [p.format(key="policy.megatron.tensor_parallel") for p in
                _fits_heads(shape.num_attention_heads, shape.num_kv_heads, tp)]
    if shape.num_layers % pp:
        problems.append(f"the model's {shape.num_layers} layers are not divisible by policy.megatron.pipeline_parallel "
                        f"({pp}): every pipeline stage holds the same number of layers")
    # AutoBridge providers keep should_pad_vocab=False, so megatron splits the vocab exactly (no padding is added)
    if shape.vocab_size % tp:
        problems.append(f"the model's vocab ({shape.vocab_size}) is not divisible by policy.megatron.tensor_parallel "
                        f"({tp}): the vocab-parallel embedding and output layer split it exactly (megatron-bridge's "
                        "AutoBridge does not pad it)")
    if megatron.sequence_parallel and tp > 1 and megatron.layer_spec == "local":
        problems.append("policy.megatron.sequence_parallel needs the Transformer Engine layer spec "
                        "(megatron's local norms assert), but policy.megatron.layer_spec is 'local'")
    return problems


def check_generation(cfg: MasterConfig, shape: ModelShape, layout: Layout) -> list[str]:
    """vLLM engines live inside one node (on the policy's devices or on their own) and split heads like megatron."""
    if cfg.generation.backend != "vllm":
        return []
    vtp, problems = layout.vllm_tensor_parallel, []
    devices_key = f"cluster.{'generation_' if layout.generation_devices_per_node else ''}devices_per_node"
    if layout.engine_devices_per_node % vtp:
        problems.append(f"generation.vllm.tensor_parallel ({vtp}) does not divide {devices_key} "
                        f"({layout.engine_devices_per_node}): each vLLM engine must fit inside one node")
    problems += [p.format(key="generation.vllm.tensor_parallel") for p in
                 _fits_heads(shape.num_attention_heads, shape.num_kv_heads, vtp)]
    return problems


# ----------------------------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryEstimate:
    """Per GPU (per worker process on CPU), in GiB; see the module docstring for the assumptions."""

    params_per_gpu: int
    weights: float
    gradients: float
    optimizer: float
    fp8_weights: float
    activations: float
    logits: float
    overhead: float
    vllm_share: float  # colocated vLLM while awake (gpu_memory_utilization x GPU memory); 0 when not on the GPU
    vllm_asleep: float
    vllm_weights: float
    vllm_kv_cache: float
    kv_bytes_per_token: int
    largest_tensor: float  # the largest full (gathered) HF tensor: the export's transient on every rank
    budget: float | None  # cluster.gpu_memory_gib; None on CPU
    refit_buffers: float = 0.0  # the refit transport's buckets on a GPU (ipc, broadcast)
    refit_streams: bool = False  # buckets: vLLM's weights are awake while the policy gathers and sends
    optimizer_offloaded: bool = False  # the optimizer's state in host memory outside the training stage

    @property
    def policy_state(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.fp8_weights

    @property
    def resident_state(self) -> float:
        """The policy's state on the GPU while vLLM holds it (generation, refit)."""
        return self.policy_state - (self.optimizer if self.optimizer_offloaded else 0.0)

    @property
    def training(self) -> float:
        return self.policy_state + self.activations + self.logits + self.overhead + self.vllm_asleep

    @property
    def generation(self) -> float:
        # the policy's resident state stays (its activation blocks were released after train), vLLM takes its share
        return self.resident_state + self.overhead + self.vllm_share

    @property
    def refit(self) -> float:
        """The refit's device peak. File: the export (vLLM asleep, one gathered tensor) or the reload (vLLM's
        weights awake, its KV cache not yet). Buckets: both at once, and the buckets."""
        if not self.vllm_share:
            return self.resident_state + self.overhead + self.largest_tensor + self.refit_buffers
        export = self.vllm_asleep + self.largest_tensor
        reload = self.vllm_asleep + self.vllm_weights
        if self.refit_streams:
            return self.resident_state + self.overhead + reload + self.largest_tensor + self.refit_buffers
        return self.resident_state + self.overhead + max(export, reload)

    def _phases(self) -> dict[str, float]:
        return {"training": self.training, "generation": self.generation, "refit": self.refit}

    @property
    def peak(self) -> float:
        return max(self._phases().values())

    @property
    def peak_phase(self) -> str:
        phases = self._phases()
        return max(phases, key=phases.__getitem__)


def params_per_gpu(shape: ModelShape, tp: int, pp: int) -> int:
    """Parameters on the busiest GPU: a stage's layers plus the embedding (first) or output layer (last), / TP."""
    layers = shape.num_layers // pp * shape.layer_params()
    if pp == 1:
        stage = layers + shape.embedding_params() * (1 if shape.tied_embeddings else 2)
    else:  # with tied embeddings the last stage still holds its own copy for the output layer
        stage = layers + shape.embedding_params()
    return math.ceil(stage / tp)


def layer_activation_elements(shape: ModelShape, *, tp: int, sp: bool, seq: int, fused_attention: bool) -> float:
    """Activation elements one layer keeps per token for its backward (Korthikanti et al. 2022, adapted)."""
    h, f = shape.hidden_size, shape.ffn_hidden_size
    qd, kvd = shape.num_attention_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    sp_split = tp if sp else 1
    # 2 norm inputs + QKV and fc1 inputs: 4h (split by SP); q, k, v, attention out: 2qd + 2kvd; SwiGLU: 3f (split by TP)
    elements = 4 * h / sp_split + (2 * qd + 2 * kvd + 3 * f) / tp
    if not fused_attention:
        elements += 2 * shape.num_attention_heads * seq / tp  # unfused attention keeps scores and softmax: 2as
    return elements


def estimate_memory(cfg: MasterConfig, shape: ModelShape, layout: Layout, *, samples_per_step: int) -> MemoryEstimate:
    megatron_backend = cfg.policy.backend == "megatron"
    megatron = cfg.policy.megatron
    tp, pp, dp = layout.tensor_parallel, layout.pipeline_parallel, max(layout.data_parallel, 1)
    seq = cfg.policy.max_total_sequence_length
    bf16 = cfg.policy.precision == "bf16"
    params = params_per_gpu(shape, tp, pp)

    # bytes per parameter. megatron: bf16|fp32 weights, fp32 grad buffer, fp32 main copy (bf16 only) + 2 Adam
    # moments, / DP with the distributed optimizer. HF policy: fp32 weights (the master copy), fp32 grads, 2 moments.
    weight_bytes = (2 if bf16 else 4) if megatron_backend else 4
    optimizer_bytes = (12 if bf16 else 8) if megatron_backend else 8
    if megatron_backend and megatron.distributed_optimizer:
        optimizer_bytes /= dp
    fp8_bytes = FP8_WEIGHT_BYTES if megatron_backend and megatron.fp8 else 0

    activations, logits = _activation_gib(cfg, shape, layout, samples_per_step=samples_per_step, seq=seq)
    vllm = _vllm_gib(cfg, shape, layout)
    on_gpu = cfg.cluster.gpu_memory_gib is not None
    colocated_vllm = on_gpu and cfg.generation.backend == "vllm" and cfg.generation.colocated
    return MemoryEstimate(
        params_per_gpu=params,
        weights=params * weight_bytes / GIB,
        gradients=params * 4 / GIB,
        optimizer=params * optimizer_bytes / GIB,
        fp8_weights=params * fp8_bytes / GIB,
        activations=activations,
        logits=logits,
        overhead=PROCESS_OVERHEAD_GIB if on_gpu else 0.0,
        vllm_share=vllm["share"] if colocated_vllm else 0.0,
        vllm_asleep=VLLM_ASLEEP_GIB if colocated_vllm else 0.0,
        vllm_weights=vllm["weights"],
        vllm_kv_cache=vllm["kv_cache"],
        kv_bytes_per_token=int(vllm["kv_bytes_per_token"]),
        largest_tensor=largest_hf_tensor_elements(shape) * weight_bytes / GIB,
        budget=cfg.cluster.gpu_memory_gib,
    )


def choose_optimizer_offload(cfg: MasterConfig, memory: MemoryEstimate) -> tuple[MemoryEstimate, MemoryEstimate]:
    """(the memory order the run uses, the other one): the optimizer's state on the GPU throughout, or in host memory
    while vLLM holds the GPU (`policy.offload_optimizer_for_generation`; auto: when keeping it does not fit)."""
    kept, offloaded = memory, dataclasses.replace(memory, optimizer_offloaded=True)
    setting = cfg.policy.offload_optimizer_for_generation
    if setting == "auto":
        setting = memory.budget is not None and memory.vllm_share > 0 and kept.peak > memory.budget
    return (offloaded, kept) if setting else (kept, offloaded)


def largest_hf_tensor_elements(shape: ModelShape) -> int:
    """The largest single HF tensor (embedding / output layer, or one MLP projection)."""
    return max(shape.embedding_params(), shape.hidden_size * shape.ffn_hidden_size)


def _activation_gib(cfg: MasterConfig, shape: ModelShape, layout: Layout, *, samples_per_step: int,
                    seq: int) -> tuple[float, float]:
    """(layer activations, logits) in GiB on the worst pipeline stage, over the train and the logprob passes."""
    megatron = cfg.policy.megatron
    is_megatron = cfg.policy.backend == "megatron"
    tp, pp = layout.tensor_parallel, layout.pipeline_parallel
    sp = is_megatron and megatron.sequence_parallel and tp > 1
    fused = cfg.cluster.gpu_memory_gib is not None and not (is_megatron and megatron.layer_spec == "local")
    act_bytes = 2 if cfg.policy.precision == "bf16" else 4
    layers = shape.num_layers // pp
    micro_batches = math.ceil(math.ceil(samples_per_step / max(layout.data_parallel, 1)) / cfg.policy.micro_batch_size)
    in_flight = min(pp, micro_batches)  # 1F1B: the first stage holds up to PP micro-batches' activations

    def tokens(rows: int) -> int:
        return rows * seq

    full_layer = layer_activation_elements(shape, tp=tp, sp=sp, seq=seq, fused_attention=fused) * act_bytes
    train_tokens = tokens(cfg.policy.micro_batch_size)
    if is_megatron and megatron.activation_recompute:
        # full recompute keeps each layer's input (h per token, split by SP) and rebuilds one layer at a time
        kept = layers * train_tokens * shape.hidden_size / (tp if sp else 1) * act_bytes
        stored, transient = kept, train_tokens * full_layer
    else:
        stored, transient = layers * train_tokens * full_layer, 0.0
    first_stage = in_flight * stored + transient
    logits_train = _logit_tokens(cfg, train_tokens) * shape.vocab_size / tp * LOGIT_BYTES_TRAIN  # last stage
    last_stage = stored + transient
    logprob_tokens = _logit_tokens(cfg, tokens(cfg.policy.logprob_micro_batch_size))
    logits_forward = logprob_tokens * shape.vocab_size / tp * LOGIT_BYTES_FORWARD
    if pp == 1:
        return first_stage / GIB, max(logits_train, logits_forward) / GIB
    if first_stage >= last_stage + logits_train:
        return first_stage / GIB, 0.0
    return last_stage / GIB, max(logits_train, logits_forward) / GIB


def _logit_tokens(cfg: MasterConfig, micro_batch_tokens: int) -> int:
    """Tokens whose full-vocab logits exist at once: one chunk of `policy.logprob_chunk_tokens` (0: all)."""
    chunk = cfg.policy.logprob_chunk_tokens
    return micro_batch_tokens if chunk == 0 else min(chunk, micro_batch_tokens)


def _vllm_gib(cfg: MasterConfig, shape: ModelShape, layout: Layout) -> dict[str, float]:
    """vLLM's share, its weights per GPU and the KV cache left for sequences (CPU: the configured KV space)."""
    vllm, vtp = cfg.generation.vllm, layout.vllm_tensor_parallel
    dtype_bytes = {"auto": shape.dtype_bytes, "float32": 4, "bfloat16": 2, "float16": 2}[vllm.dtype]
    linear_bytes = 1 if vllm.quantization else dtype_bytes  # FP8 quantizes the linear layers only
    embeddings = shape.embedding_params() * (1 if shape.tied_embeddings else 2)
    weights = (shape.num_layers * shape.layer_params() * linear_bytes + embeddings * dtype_bytes) / vtp / GIB
    kv_heads_per_gpu = math.ceil(shape.num_kv_heads / vtp)  # KV heads are replicated when vLLM's TP exceeds them
    kv_bytes_per_token = 2 * shape.num_layers * kv_heads_per_gpu * shape.head_dim * dtype_bytes  # K and V
    if cfg.cluster.gpu_memory_gib is None:
        return {"share": 0.0, "weights": weights, "kv_cache": float(vllm.cpu_kv_cache_gib),
                "kv_bytes_per_token": kv_bytes_per_token}
    share = vllm.gpu_memory_utilization * cfg.cluster.gpu_memory_gib
    return {"share": share, "weights": weights, "kv_cache": share - weights - VLLM_RESERVE_GIB,
            "kv_bytes_per_token": kv_bytes_per_token}


def check_memory(cfg: MasterConfig, memory: MemoryEstimate, other: MemoryEstimate) -> list[str]:
    """The estimate must fit the GPU (`other`: the other optimizer placement); vLLM's share must hold its weights
    with room for a KV cache."""
    everything_in_the_driver = cfg.generation.backend != "vllm" and cfg.policy.backend != "megatron"
    if memory.budget is None or everything_in_the_driver:
        return []
    problems = []
    if cfg.generation.backend == "vllm" and memory.vllm_kv_cache <= 0:
        utilization = cfg.generation.vllm.gpu_memory_utilization  # apart, vLLM's GPUs are its own: no colocated share
        problems.append(
            f"generation.vllm.gpu_memory_utilization ({utilization}) x cluster.gpu_memory_gib ({memory.budget:g}) = "
            f"{utilization * memory.budget:.1f} GiB does not hold vLLM's weights ({memory.vllm_weights:.1f} GiB per "
            f"GPU) plus its {VLLM_RESERVE_GIB:g} GiB working reserve: no room for a KV cache; raise "
            "gpu_memory_utilization or generation.vllm.tensor_parallel")
    if memory.peak > memory.budget:
        problems.append(
            f"estimated peak memory per GPU ({memory.peak_phase}) {memory.peak:.1f} GiB exceeds cluster.gpu_memory_gib "
            f"({memory.budget:g} GiB): training {memory.training:.1f}, generation {memory.generation:.1f}, refit "
            f"{memory.refit:.1f}; policy state {memory.policy_state:.1f} + activations "
            f"{memory.activations + memory.logits:.1f} + vLLM {max(memory.vllm_share, memory.vllm_asleep):.1f} + "
            f"overhead {memory.overhead:.1f}; {_offload_clause(memory, other)}; lower "
            "generation.vllm.gpu_memory_utilization, raise TP/PP, or turn on policy.megatron.activation_recompute / "
            "distributed_optimizer (--ignore-memory-estimate launches anyway)")
    return problems


def _offload_clause(memory: MemoryEstimate, other: MemoryEstimate) -> str:
    if memory.optimizer_offloaded:
        return f"the optimizer's state is in host memory while vLLM holds the GPU ({other.peak:.1f} GiB if kept)"
    return (f"with the optimizer's state in host memory while vLLM holds the GPU the peak would be {other.peak:.1f} "
            "GiB (policy.offload_optimizer_for_generation)")


# ----------------------------------------------------------------------------------------------- refit


def estimate_refit(cfg: MasterConfig, shape: ModelShape, layout: Layout) -> RefitEstimate:
    on_gpu = cfg.cluster.gpu_memory_gib is not None
    vllm = cfg.generation.backend == "vllm"
    transport = resolve_transport(cfg.refit, on_gpu=on_gpu, colocated=cfg.generation.colocated, vllm=vllm)
    return estimate_refit_cost(shape, precision=cfg.policy.precision, layout=layout,
                               engine_tensor_parallel=layout.vllm_tensor_parallel if vllm else 1, on_gpu=on_gpu,
                               transport=transport, bucket_bytes=cfg.refit.bucket_mb * MIB)


# ----------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class LaunchPlan:
    cfg: MasterConfig
    shape: ModelShape
    shape_source: str
    layout: Layout
    base_samples: int
    max_correction_samples: int
    memory: MemoryEstimate  # the optimizer placement the run uses
    memory_other: MemoryEstimate  # the other one
    refit: RefitEstimate
    notes: list[str] = field(default_factory=list)
    memory_problems: list[str] = field(default_factory=list)

    @property
    def max_samples(self) -> int:
        return self.base_samples + self.max_correction_samples

    def lines(self) -> list[str]:
        return [self._devices_line(), self._model_line(), *self._placement_lines(), self._rollouts_line(),
                self._tokens_line(), *self._memory_lines(), *self._refit_lines(),
                *(f"note: {note}" for note in self.notes)]

    def _refit_lines(self) -> list[str]:
        return refit_lines(self.refit)

    def _devices_line(self) -> str:
        layout, budget = self.layout, self.cfg.cluster.gpu_memory_gib
        per_node, world = f"{layout.devices_per_node}", layout.world
        if layout.generation_devices_per_node:  # two sides, each with its own devices
            per_node = f"({layout.devices_per_node} policy + {layout.generation_devices_per_node} generation)"
            world += layout.num_nodes * layout.generation_devices_per_node
        if budget is None:  # sides apart on a CPU: each bound to its own cores (distributed/cpu_binding.py)
            bound = ", each side bound to its own cores" if layout.generation_devices_per_node else ""
            return (f"cluster: {layout.num_nodes} node(s) x {per_node} CPU worker process(es) = {world} (no GPU: the "
                    f"workers share the host's memory{bound}; figures below are per process)")
        return f"cluster: {layout.num_nodes} node(s) x {per_node} GPUs = {world} GPUs of {budget:g} GiB"

    def _model_line(self) -> str:
        return f"model: {self.cfg.policy.model_name} ({self.shape_source}): {self.shape.describe()}"

    def _placement_lines(self) -> list[str]:
        cfg, layout = self.cfg, self.layout
        if cfg.policy.backend == "megatron":
            megatron = cfg.policy.megatron
            sequence_parallel = megatron.sequence_parallel and layout.tensor_parallel > 1
            switches = [f"{cfg.policy.precision}", f"{megatron.layer_spec} layer spec",
                        f"sequence parallel {'on' if sequence_parallel else 'off'}",
                        f"distributed optimizer {'on' if megatron.distributed_optimizer else 'off'}",
                        f"activation recompute {'full' if megatron.activation_recompute else 'off'}"]
            if megatron.fp8:
                switches.append(f"fp8 {megatron.fp8} ({megatron.fp8_recipe})")
            stage_layers = self.shape.num_layers // layout.pipeline_parallel
            policy = (f"policy: Megatron TP {layout.tensor_parallel} x PP {layout.pipeline_parallel} x DP "
                      f"{layout.data_parallel} = {layout.world} ranks, {stage_layers} "
                      f"layers per stage, {format_params(self.memory.params_per_gpu)} parameters on the busiest rank; "
                      + ", ".join(switches))
        else:
            policy = "policy: HF transformers in the driver process (one device, no model parallelism)"
        if cfg.generation.backend != "vllm":
            return [policy, "generation: HF transformers generate in the driver process"]
        vllm = cfg.generation.vllm
        weights = f"{vllm.dtype} weights" + (f", {engine_fp8_scaling(cfg)}" if vllm.quantization else "")
        sleeps = " (vLLM sleeps while the policy trains)" if cfg.cluster.gpu_memory_gib is not None else ""
        where = f"colocated on the policy's devices{sleeps}" if cfg.generation.colocated else \
            "on devices of their own, beside the policy's on every node (the refit below reaches them)"
        return [policy, f"generation: {layout.vllm_engines} vLLM engine(s) x TP {layout.vllm_tensor_parallel} "
                        f"({layout.engine_devices_per_node // layout.vllm_tensor_parallel} per node), {weights}, "
                        f"{where}"]

    def _rollouts_line(self) -> str:
        cfg = self.cfg
        base = f"{self.base_samples} base ({cfg.grpo.prompts_per_step} prompts x {cfg.grpo.samples_per_prompt})"
        if self.max_correction_samples:
            anchors = self.max_correction_samples // cfg.cipo.samples_per_anchor
            base += (f" + up to {self.max_correction_samples} corrections ({anchors} anchors x "
                     f"{cfg.cipo.samples_per_anchor}) = {self.max_samples}")
        dp = max(self.layout.data_parallel, 1)
        per_rank = math.ceil(self.max_samples / dp)
        micro = math.ceil(per_rank / cfg.policy.micro_batch_size)
        rows, length = cfg.policy.micro_batch_size, cfg.policy.max_total_sequence_length
        unit = (f"packed rows of {rows} x {length} tokens (fewer when samples are short)" if cfg.policy.sequence_packing
                else f"micro-batch(es) of {rows}")
        return f"rollouts per step: {base}; per DP rank up to {per_rank} samples = at most {micro} {unit}"

    def _tokens_line(self) -> str:
        cfg = self.cfg
        generated = self.max_samples * cfg.generation.max_new_tokens  # every response at max_new_tokens
        trained = self.max_samples * cfg.policy.max_total_sequence_length  # every sample at the sequence cap
        return (f"tokens per step (upper bounds): generated <= {_count(generated)} ({self.max_samples} x "
                f"{cfg.generation.max_new_tokens}), trained <= {_count(trained)} ({self.max_samples} x "
                f"{cfg.policy.max_total_sequence_length} prompt + response)")

    def _memory_lines(self) -> list[str]:
        m, cfg = self.memory, self.cfg
        unit = "process" if m.budget is None else "GPU"
        dp = max(self.layout.data_parallel, 1)
        optimizer = ("sharded over DP " + str(dp)) if cfg.policy.backend == "megatron" and \
            cfg.policy.megatron.distributed_optimizer else "not sharded"
        lines = [f"memory per {unit} (estimate, busiest pipeline stage):",
                 f"  policy state {m.policy_state:.1f} GiB = weights {m.weights:.1f} + fp32 gradients "
                 f"{m.gradients:.1f} + optimizer {m.optimizer:.1f} ({optimizer})"
                 + (f" + FP8 weight copies {m.fp8_weights:.1f}" if m.fp8_weights else ""),
                 f"  activations {m.activations:.1f} GiB + logits {m.logits:.1f} GiB (micro-batch "
                 f"{cfg.policy.micro_batch_size} x {cfg.policy.max_total_sequence_length} tokens)"]
        if cfg.generation.backend == "vllm":
            tokens = m.vllm_kv_cache * GIB / m.kv_bytes_per_token if m.vllm_kv_cache > 0 else 0
            sequences = tokens / cfg.policy.max_total_sequence_length
            share = (f"vLLM share {m.vllm_share:.1f} GiB (gpu_memory_utilization "
                     f"{cfg.generation.vllm.gpu_memory_utilization} x {m.budget:g}): " if m.vllm_share else "vLLM: ")
            if not cfg.generation.colocated and m.budget is not None:
                share = f"vLLM on its own GPUs: {cfg.generation.vllm.gpu_memory_utilization} x {m.budget:g} GiB: "
            lines.append(f"  {share}weights {m.vllm_weights:.1f} GiB + KV cache {m.vllm_kv_cache:.1f} GiB "
                         f"(~{_count(tokens)} tokens = {sequences:.0f} full-length sequences per engine)")
        if m.budget is None:
            engine = m.vllm_weights + m.vllm_kv_cache if cfg.generation.backend == "vllm" else 0.0
            lines.append(f"  host memory: policy worker {m.training:.1f} GiB + vLLM engine {engine:.1f} GiB per device "
                         "(CPU: no per-device budget is checked)")
            return lines
        verdict = "fits" if not self.memory_problems else "DOES NOT FIT"
        lines.append(f"  peak {m.peak:.1f} GiB of {m.budget:g} GiB ({m.peak_phase}; training {m.training:.1f}, "
                     f"generation {m.generation:.1f}, refit {m.refit:.1f}, overhead {m.overhead:.1f}): {verdict}")
        kept, offloaded = (self.memory_other, m) if m.optimizer_offloaded else (m, self.memory_other)
        lines.append(f"  optimizer state ({m.optimizer:.1f} GiB) in host memory while vLLM holds the GPU "
                     f"(policy.offload_optimizer_for_generation: {cfg.policy.offload_optimizer_for_generation}): "
                     f"{'yes' if m.optimizer_offloaded else 'no'}; peak {kept.peak:.1f} GiB keeping it on the GPU, "
                     f"{offloaded.peak:.1f} GiB moving it")
        return lines


def _count(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def plan_notes(cfg: MasterConfig, layout: Layout, *, max_samples: int) -> list[str]:
    """Things that will not stop the run but that the user should know."""
    notes, megatron = [], cfg.policy.megatron
    if cfg.policy.backend == "megatron" and megatron.sequence_parallel and layout.tensor_parallel == 1:
        notes.append("policy.megatron.sequence_parallel is ignored at tensor_parallel 1")
    dp = max(layout.data_parallel, 1)
    micro = math.ceil(math.ceil(max_samples / dp) / cfg.policy.micro_batch_size)
    if cfg.policy.backend == "megatron" and layout.pipeline_parallel > 1 and micro < layout.pipeline_parallel:
        notes.append(f"only {micro} micro-batch(es) per DP rank for {layout.pipeline_parallel} pipeline stages: "
                     "most of each step is pipeline bubble")
    longest = cfg.data.max_prompt_tokens + cfg.cipo.attempt_max_tokens + TEMPLATE_TOKENS
    if cfg.cipo.enabled and longest + cfg.generation.max_new_tokens > cfg.policy.max_total_sequence_length:
        notes.append(f"a correction prompt may reach ~{longest} tokens (data.max_prompt_tokens + "
                     f"cipo.attempt_max_tokens + template); with max_new_tokens {cfg.generation.max_new_tokens} that "
                     f"exceeds policy.max_total_sequence_length ({cfg.policy.max_total_sequence_length}), so the "
                     "longest corrections are cut short or their anchors dropped")
    if cfg.cipo.enabled and cfg.cipo.risk_penalty > 0 and cfg.cipo.advantage_mode == "group":
        # a correct anchor's group: r~ = r (1 + lambda_risk) - lambda_risk, affine, and (r~ - mean) / std undoes it
        notes.append("cipo.risk_penalty does not change the advantages while cipo.advantage_mode is group: every "
                     "sample of a correction group shares its anchor, so the penalty rescales that group's rewards "
                     "and the group std normalization cancels it; use advantage_mode stream or anchor")
    return notes


def plan_launch(cfg: MasterConfig, *, base_samples: int, max_correction_samples: int) -> LaunchPlan:
    """Resolve the config against its cluster; raises LayoutError naming every broken rule (memory separately)."""
    shape, source = find_model_shape(cfg.policy.model_name, cfg.policy.model_revision)
    layout = layout_of(cfg)
    problems = check_cluster(cfg, layout)
    if not problems:  # the rules below divide by DP
        problems += check_model_split(cfg, shape, layout)
    problems += check_generation(cfg, shape, layout) + check_precision(cfg)
    if problems:
        raise LayoutError("\n".join(problems))
    max_samples = base_samples + max_correction_samples
    refit = estimate_refit(cfg, shape, layout)
    estimate = dataclasses.replace(estimate_memory(cfg, shape, layout, samples_per_step=max_samples),
                                   refit_buffers=refit.device_buffer_bytes / GIB, refit_streams=refit.chosen != "file")
    memory, other = choose_optimizer_offload(cfg, estimate)
    return LaunchPlan(cfg=cfg, shape=shape, shape_source=source, layout=layout, base_samples=base_samples,
                      max_correction_samples=max_correction_samples, memory=memory, memory_other=other, refit=refit,
                      notes=plan_notes(cfg, layout, max_samples=max_samples),
                      memory_problems=check_memory(cfg, memory, other) + check_refit_host(refit))
