"""The one config schema of cipo_nemo.

Every run is described by a `MasterConfig`. Values come from YAML (`conf/cipo_base.yaml` is the exemplar that
sets every field; presets inherit from it with `defaults:`) plus command-line overrides; the schema holds no
defaults of its own, so the exemplar is the one place where defaults live. Models are strict (no silent type
coercion), reject unknown keys and are frozen after validation.

Cross-field rules are field validators on the *later* field of a pair, so that an error's location names the
key the user has to change (e.g. `cipo.rho.max` when `rho.min > rho.max`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator

from cipo_nemo.config.durations import parse_duration
from cipo_nemo.config.data_schema import (  # noqa: F401  (re-exported: the one schema is read from here)
    DataConfig,
    DataSourceConfig,
    FileFields,
    FileSourceConfig,
    HubSourceConfig,
    InstructionConfig,
    ReasoningGymSourceConfig,
)
from cipo_nemo.config.fields import (  # noqa: F401  (re-exported)
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    StrictModel,
    TaskFamily,
    not_below,
    require_placeholders,
)
from cipo_nemo.config.placement_schema import AsyncConfig, ClusterConfig, RefitConfig


class RunConfig(StrictModel):
    name: str = Field(min_length=1, description="Run name; used in the output directory and logger run names.")
    output_dir: str = Field(min_length=1, description="Directory for metrics, checkpoints and the resolved config.")
    seed: Annotated[int, Field(ge=0)] = Field(description="Seed for data order, anchor selection and sampling.")


class DynamicSamplingConfig(StrictModel):
    """DAPO's dynamic sampling (arXiv 2503.14476): draw prompt groups until the batch holds prompts_per_step groups
    with a non-zero advantage."""

    enabled: bool = Field(description="Sample more prompt groups until prompts_per_step of them carry gradient.")
    max_rounds: PositiveInt = Field(
        description="Rounds of prompts_per_step prompts drawn at most per step; a step still short trains on what "
        "it has and says so."
    )


class GRPOConfig(StrictModel):
    """The base stream: standard GRPO on the original prompts (docs/design.md step 1)."""

    num_steps: PositiveInt = Field(description="RL steps (one rollout batch and one policy update each).")
    prompts_per_step: PositiveInt = Field(description="B: prompts drawn per step.")
    samples_per_prompt: PositiveInt = Field(description="G: rollouts per prompt (the GRPO group size).")
    normalize_std: bool = Field(description="Divide advantages by the group std (false = Dr.GRPO).")
    leave_one_out: bool = Field(description="Use the leave-one-out mean of the group as the baseline (RLOO).")
    std_eps: PositiveFloat = Field(description="eps in A = (r - mean) / (std + eps).")
    dynamic_sampling: DynamicSamplingConfig
    mask_truncated: bool = Field(
        description="Leave responses cut at generation.max_new_tokens out of the loss and its normalizer (DAPO's "
        "overlong filtering); they still count in their group's advantage baseline."
    )
    overlong_buffer: NonNegativeInt = Field(
        description="DAPO's soft overlong punishment over the last this many tokens before max_new_tokens: "
        "r -= factor * (length - (max_new_tokens - buffer)) / buffer there (0 = off). Both streams."
    )
    overlong_penalty_factor: NonNegativeFloat = Field(description="The punishment at max_new_tokens itself.")


class RhoConfig(StrictModel):
    """Adaptive share of successful anchors (paper section 3.2)."""

    min: Probability = Field(description="Lower bound of rho.")
    max: Probability = Field(description="Upper bound of rho.")
    init: Probability = Field(description="rho_0: share of successful anchors at step 0 (within [min, max]).")
    tau: float | Literal["auto"] = Field(
        description="Retention target: rho rises while retention < tau. auto: set once from the first step that "
        "measures retention, tau = min(0.95, retention + tau_margin)."
    )
    tau_margin: NonNegativeFloat = Field(description="tau: auto only: the margin added to the first measured retention.")
    rule: Literal["multiplicative", "proportional"] = Field(
        description="multiplicative: rho *= 1 + w_level*(tau-ret) + w_drop*drop + w_streak*streak; "
        "proportional: rho += eta*(tau-ret)."
    )
    w_level: NonNegativeFloat = Field(description="multiplicative rule: weight of (tau - retention).")
    w_drop: NonNegativeFloat = Field(description="multiplicative rule: weight of the retention drop since last step.")
    w_streak: NonNegativeFloat = Field(description="multiplicative rule: weight of the below-tau streak length.")
    streak_cap: Annotated[int, Field(ge=0)] = Field(description="multiplicative rule: cap on the streak length.")
    eta: NonNegativeFloat = Field(description="proportional rule: step size.")

    @field_validator("tau", mode="plain")
    @classmethod
    def _tau_probability_or_auto(cls, value: object) -> float | str:
        # One plain check instead of a union, so that a bad value gets one message rather than one per member.
        if value == "auto":
            return "auto"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError("must be a probability in [0, 1] or 'auto'")
        return float(value)

    @field_validator("max")
    @classmethod
    def _max_not_below_min(cls, value: float, info: ValidationInfo) -> float:
        return not_below(value, info, "min")

    @field_validator("init")
    @classmethod
    def _init_inside_bounds(cls, value: float, info: ValidationInfo) -> float:
        low, high = info.data.get("min"), info.data.get("max")
        if low is not None and high is not None and not low <= value <= high:
            raise ValueError(f"must lie in [min, max] = [{low}, {high}], got {value}")
        return value


class CorrectionTemplates(StrictModel):
    """Correction prompt per task family. `{problem}` and `{attempt}` are replaced literally (other braces,
    e.g. LaTeX's `\\boxed{}`, stay as written); code templates also get `{language}`."""

    math: str = Field(description="Math correction prompt; needs {problem} and {attempt}.")
    code: str = Field(description="Code correction prompt; needs {problem}, {attempt} and {language}.")

    @field_validator("math")
    @classmethod
    def _math_placeholders(cls, value: str) -> str:
        return require_placeholders(value, ("{problem}", "{attempt}"))

    @field_validator("code")
    @classmethod
    def _code_placeholders(cls, value: str) -> str:
        return require_placeholders(value, ("{problem}", "{attempt}", "{language}"))


class CorrectionConfig(StrictModel):
    """The correction stream (docs/design.md steps 2-7). `enabled: false` turns CIPO into plain GRPO."""

    enabled: bool = Field(description="Run the correction stream (false = GRPO baseline).")
    samples_per_anchor: PositiveInt = Field(description="G_c: corrections sampled per correction prompt.")
    max_anchors_per_step: PositiveInt = Field(description="Cap on anchors (correction prompts) per step.")
    loss_weight: NonNegativeFloat = Field(description="lambda_c: weight of the correction stream in the loss.")
    risk_penalty: NonNegativeFloat = Field(description="lambda_risk: subtracted when a correct anchor is broken.")
    advantage_mode: Literal["stream", "anchor", "group"] = Field(
        description="Correction advantages: stream (group-mean baseline, one scale for the stream), anchor (the "
        "anchor's reward as baseline) or group (per-group std; makes risk_penalty inert)."
    )
    difficulty_low: Probability = Field(description="p_low: preferred anchors come from prompts with p >= p_low.")
    difficulty_high: Probability = Field(description="p_high: preferred anchors come from prompts with p <= p_high.")
    allow_out_of_window: bool = Field(description="Fill missing anchors from prompts outside [p_low, p_high].")
    attempt_max_tokens: PositiveInt = Field(description="Token budget of the quoted attempt (left-truncated).")
    strip_thinking: bool = Field(description="Remove <think>...</think> from the attempt before quoting it.")
    anchor_source: Literal["policy", "frozen_start"] = Field(
        description="What a correction prompt quotes: policy (the anchor itself, the policy's own sample) or "
        "frozen_start (a start-model attempt at the same problem with the anchor's verdict, from frozen_attempts; "
        "the anchors are chosen as always). cipo_nemo/data/frozen_attempts.py."
    )
    frozen_attempts: str | None = Field(
        description="anchor_source frozen_start only: JSON Lines of the start model's attempts per training item "
        "(id, responses, rewards; the eval harness's samples.jsonl)."
    )
    templates: CorrectionTemplates
    rho: RhoConfig

    @field_validator("difficulty_high")
    @classmethod
    def _window_ordered(cls, value: float, info: ValidationInfo) -> float:
        return not_below(value, info, "difficulty_low")

    @field_validator("frozen_attempts")
    @classmethod
    def _frozen_attempts_with_frozen_source(cls, value: str | None, info: ValidationInfo) -> str | None:
        source = info.data.get("anchor_source")
        if source == "frozen_start" and not value:
            raise ValueError("anchor_source frozen_start needs the start model's attempts: set cipo.frozen_attempts")
        if source == "policy" and value is not None:
            raise ValueError("is read only with anchor_source frozen_start (it is policy): set it to null")
        return value


class LossConfig(StrictModel):
    """Token-level clipped surrogate shared by both streams (docs/design.md step 6)."""

    clip_low: NonNegativeFloat = Field(description="Ratio clipped below at 1 - clip_low.")
    clip_high: NonNegativeFloat = Field(description="Ratio clipped above at 1 + clip_high (clip-higher when > clip_low).")
    normalization: Literal["token", "sequence"] = Field(
        description="token: sum over valid tokens / global token count; sequence: per-sequence mean / global sequences."
    )
    kl_beta: NonNegativeFloat = Field(description="beta of the KL penalty to the reference policy (0 = off).")
    kl_estimator: Literal["k1", "k3"] = Field(description="KL estimator per token (k3 is non-negative).")
    importance_sampling: bool = Field(description="Truncated importance-sampling correction generation -> trainer.")
    is_truncation: Annotated[float, Field(ge=1.0)] = Field(
        description="Cap C of the TIS weight min(ratio, C); the upper end of the icepop / seq-mask-tis band.")
    is_type: Literal["tis", "icepop", "seq-mask-tis"] = Field(
        description="tis: min(ratio, C) per token; icepop: tokens whose ratio is outside [is_lower_bound, C] get "
        "weight 0; seq-mask-tis: sequences whose geometric-mean ratio is outside it get weight 0 (NeMo-RL's names).")
    is_lower_bound: NonNegativeFloat = Field(description="Lower end L of the icepop / seq-mask-tis band.")
    skip_zero_advantage: bool | Literal["auto"] = Field(
        description="Samples whose advantage is 0 leave the pi_old and train passes; the loss keeps their share of "
        "its normalizer, so the update is unchanged. auto: on when exact (kl_beta = 0); true with kl_beta > 0 is "
        "refused (the KL term is not zero at zero advantage)."
    )

    @field_validator("is_lower_bound")
    @classmethod
    def _band_not_empty(cls, value: float, info: ValidationInfo) -> float:
        truncation = info.data.get("is_truncation")
        if truncation is not None and value > truncation:
            raise ValueError(f"must be <= is_truncation ({truncation}): the band [L, C] is empty")
        return value

    @field_validator("skip_zero_advantage", mode="plain")
    @classmethod
    def _skip_only_where_exact(cls, value: object, info: ValidationInfo) -> bool | str:
        # One plain check instead of a union, so that a bad value gets one message rather than one per member.
        if value != "auto" and not isinstance(value, bool):
            raise ValueError("must be true, false or 'auto'")
        kl_beta = info.data.get("kl_beta")
        if value is True and kl_beta is not None and kl_beta > 0:
            raise ValueError(f"true is not exact with kl_beta = {kl_beta} > 0 (the KL term is not zero at zero "
                             "advantage): set it to auto (off here) or false")
        return value

    def skips_zero_advantage(self) -> bool:
        """Whether zero-advantage samples leave the passes: exact only when no loss term survives A = 0."""
        return self.skip_zero_advantage is True or (self.skip_zero_advantage == "auto" and self.kl_beta == 0)


class VerifierConfig(StrictModel):
    num_workers: PositiveInt = Field(description="Processes scoring answers in parallel.")
    timeout_s: PositiveFloat = Field(description="Per-item timeout; a timed-out item scores 0 (reason 'timeout'); "
                                     "with `custom`, the limit of one call of the function.")
    custom: str | None = Field(
        pattern=r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$",
        description="'package.module:function' scoring every item instead of the built-in verifiers: called with "
        "(items, responses), returns one (reward, reason) per row; importable from PYTHONPATH (null: built-in).",
    )
    custom_batch_size: PositiveInt = Field(description="custom: rows per call of the function (each call gets timeout_s).")


class OptimizerConfig(StrictModel):
    lr: PositiveFloat = Field(description="Peak learning rate.")
    min_lr: NonNegativeFloat = Field(description="Learning rate at the end of the decay.")
    weight_decay: NonNegativeFloat = Field(description="Decoupled weight decay (AdamW).")
    adam_beta1: Probability = Field(description="Adam beta1.")
    adam_beta2: Probability = Field(description="Adam beta2.")
    adam_eps: PositiveFloat = Field(description="Adam epsilon.")
    clip_grad: NonNegativeFloat = Field(description="Global gradient-norm clip (0 = off).")
    warmup_steps: Annotated[int, Field(ge=0)] = Field(description="Linear warmup steps (optimizer steps).")
    decay: Literal["constant", "linear", "cosine"] = Field(description="Schedule after warmup.")

    @field_validator("min_lr")
    @classmethod
    def _min_lr_not_above_lr(cls, value: float, info: ValidationInfo) -> float:
        lr = info.data.get("lr")
        if lr is not None and value > lr:
            raise ValueError(f"must be <= lr ({lr}), got {value}")
        return value


class MegatronConfig(StrictModel):
    """Megatron-core layout and switches (backend: megatron)."""

    tensor_parallel: PositiveInt = Field(description="TP size.")
    pipeline_parallel: PositiveInt = Field(description="PP size; data parallel = world / (TP * PP).")
    sequence_parallel: bool = Field(description="Megatron sequence parallelism (GPU with TE only).")
    distributed_optimizer: bool = Field(description="Shard optimizer state over data-parallel ranks.")
    activation_recompute: bool = Field(description="Recompute activations in the backward pass (full, uniform).")
    layer_spec: Literal["auto", "transformer_engine", "local"] = Field(
        description="auto: Transformer Engine layers when TE is importable (GPU), else megatron's local spec (CPU)."
    )
    local_core_attention: Literal["sdpa", "megatron"] = Field(
        description="Core attention of the local spec: sdpa = torch's fused scaled_dot_product_attention kernels; "
        "megatron = megatron-core's unfused DotProductAttention."
    )
    fp8: Literal["e4m3", "hybrid"] | None = Field(description="FP8 training format (needs TE; null = off).")
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = Field(description="TE FP8 scaling recipe.")

    @field_validator("fp8")
    @classmethod
    def _fp8_needs_te(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("layer_spec") == "local":
            raise ValueError("fp8 needs layer_spec auto or transformer_engine (the local spec has no FP8)")
        return value


class PolicyConfig(StrictModel):
    backend: Literal["megatron", "hf"] = Field(description="megatron: Megatron-core via megatron-bridge; hf: transformers.")
    model_name: str = Field(min_length=1, description="Hugging Face checkpoint directory, or a hub id: taken from the HF "
                            "cache, or downloaded there once by the preflight (HF_HUB_OFFLINE=1: must be cached).")
    model_revision: str | None = Field(
        min_length=1, description="Hub revision (branch, tag or commit) of a hub id model_name (null: main).")
    tokenizer: str | None = Field(description="Tokenizer directory (null: the model's).")
    precision: Literal["fp32", "bf16"] = Field(description="Training dtype (fp32 on CPU unless cpu_bf16).")
    cpu_bf16: bool = Field(description="On a CPU with avx512_bf16/amx_bf16, train in bf16 when precision is bf16 "
                                       "(about 2x faster training; token_mult_prob_error ~1.03 instead of ~1.00001).")
    micro_batch_size: PositiveInt = Field(description="Samples per micro-batch in train().")
    train_global_batch_size: PositiveInt | None = Field(
        description="Samples per optimizer step; a step's rollouts are split into mini-batches of this many "
        "(null: all of them, one optimizer step)."
    )
    epochs_per_batch: PositiveInt = Field(description="Passes over a step's rollouts (shuffled per epoch).")
    logprob_micro_batch_size: PositiveInt = Field(description="Samples per micro-batch in get_logprobs().")
    logprob_chunk_tokens: NonNegativeInt = Field(
        description="Tokens whose output projection and log-softmax run at once in the logprob and train passes "
        "(full-vocab fp32 logits exist for one chunk only); 0: the whole micro-batch at once."
    )
    max_total_sequence_length: PositiveInt = Field(description="Prompt + response tokens, at most.")
    sequence_packing: bool = Field(
        description="Pack whole samples into rows of micro_batch_size x max_total_sequence_length tokens (no "
        "padding; THD with Transformer Engine, a block-diagonal mask otherwise)."
    )
    reference_policy: Literal["cpu_copy", "none"] = Field(
        description="cpu_copy: the initial weights kept on CPU and swapped in for reference logprobs (needed by kl_beta)."
    )
    offload_optimizer_for_generation: bool | Literal["auto"] = Field(
        description="Keep the optimizer's state (moments, fp32 main weights) in host memory except while the policy "
        "trains, so a colocated vLLM engine has that memory; auto: only when the dry run's peak per GPU does not "
        "fit otherwise."
    )
    optimizer: OptimizerConfig
    megatron: MegatronConfig

    @field_validator("offload_optimizer_for_generation", mode="plain")
    @classmethod
    def _true_false_or_auto(cls, value: object) -> bool | str:
        if value == "auto" or isinstance(value, bool):
            return value
        raise ValueError("must be true, false or 'auto'")


class VllmConfig(StrictModel):
    tensor_parallel: PositiveInt = Field(description="vLLM TP size per engine.")
    gpu_memory_utilization: Annotated[float, Field(gt=0.0, le=1.0)] = Field(description="Share of GPU memory vLLM may use.")
    cpu_kv_cache_gib: PositiveInt = Field(description="KV cache size on CPU in whole GiB (VLLM_CPU_KVCACHE_SPACE).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(description="Engine dtype.")
    quantization: Literal["fp8_per_block", "fp8_per_tensor"] | None = Field(
        description="Online FP8 in vLLM (GPU), by vLLM's own names: fp8_per_block = 128x128 weight blocks and 1x128 "
        "activation groups, the scaling of the blockwise FP8 trainer; fp8_per_tensor = one scale per tensor. `fp8` "
        "is read as fp8_per_block (vLLM itself reads it as per-tensor).")
    enforce_eager: bool = Field(description="No CUDA graphs (always on CPU).")
    max_num_batched_tokens: PositiveInt | None = Field(
        description="Tokens one engine step may process (prefill + decode); null: vLLM's default (CPU: 4096 x TP, "
        "at least max_model_len). On CPU a prompt's prefill is never split, so it must be >= max_model_len."
    )

    @field_validator("quantization", mode="before")
    @classmethod
    def _fp8_means_the_trainers_blocks(cls, value: Any) -> Any:
        # vLLM 0.32 maps a bare "fp8" to per-tensor online FP8 (model_loader/weight_utils.py:351-357), which would
        # sample with other scales than the blockwise FP8 policy trains with
        return "fp8_per_block" if value == "fp8" else value


class GenerationConfig(StrictModel):
    backend: Literal["vllm", "hf"] = Field(description="vllm: vLLM engine (vllm-cpu here); hf: transformers generate.")
    max_new_tokens: PositiveInt = Field(description="Longest response sampled.")
    temperature: NonNegativeFloat = Field(description="Sampling temperature (0 = greedy).")
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = Field(description="Nucleus sampling mass.")
    stop_strings: list[str] = Field(description="Generation stops after any of these strings.")
    colocated: bool = Field(description="Generation shares the policy's devices (sleep/wake around training); false: "
                            "the engines get cluster.generation_devices_per_node devices of their own on every node.")
    vllm: VllmConfig


class WandbConfig(StrictModel):
    """A Weights & Biases run through wandb's own client; WANDB_MODE (e.g. offline), WANDB_API_KEY and the other
    WANDB_* variables apply as usual."""

    project: str | None = Field(description="W&B project (null: W&B off).")
    entity: str | None = Field(description="Team or user owning the project (null: the API key's default).")


class MlflowConfig(StrictModel):
    """An MLflow run through MLflow's own client (the mlflow-skinny package is enough)."""

    tracking_uri: str | None = Field(
        description="Tracking URI: http(s)://server, databricks, or a file store file:///path (MLflow 3 needs "
        "MLFLOW_ALLOW_FILE_STORE=true for that) (null: MLflow off)."
    )
    experiment: str = Field(min_length=1, description="Experiment name (created when absent).")


class LoggerConfig(StrictModel):
    tensorboard: bool = Field(description="Write TensorBoard events (JSONL metrics are always written).")
    wandb: WandbConfig
    mlflow: MlflowConfig
    plot: bool = Field(description="Write a PNG of reward / pass-rate / correction curves at the end.")
    samples_every: Annotated[int, Field(ge=0)] = Field(
        description="Write the step's samples to <output_dir>/samples/step_<N>.jsonl every N steps (0 = never)."
    )


class CheckpointConfig(StrictModel):
    save_every: Annotated[int, Field(ge=0)] = Field(description="Save every N steps (0 = only at the end).")
    keep_last: PositiveInt = Field(description="Complete checkpoints kept; older ones are deleted.")
    resume: Literal["auto", "never", "force"] = Field(
        description="auto: continue from the latest complete checkpoint (stops if the model, cipo.enabled or the "
        "policy layout changed); force: continue even then; never: start fresh."
    )
    resume_from: str | None = Field(
        description="Checkpoint (or run directory: its latest) to start from when this run directory has none."
    )
    keep_best: str | None = Field(
        description="Validation metric (val/pass@K or val/reward_mean) whose best checkpoint is kept besides the "
        "last keep_last, recorded in checkpoints/best.json (null: off)."
    )
    keep_best_mode: Literal["max", "min"] = Field(description="Whether the best keep_best value is the highest or lowest.")
    save_hf_at_end: bool = Field(description="Write the final policy as a Hugging Face directory (run_dir/hf_model).")
    checkpoint_must_save_by: str | None = Field(
        description="'DD:HH:MM:SS' or 'HH:MM:SS' since the driver started: checkpoint and stop (exit code 75) "
        "when the next step would likely end later (null: no limit)."
    )
    stop_after_step: PositiveInt | None = Field(
        description="End this invocation after this step with a checkpoint (exit code 75, like an early stop); a "
        "later run with a higher value (or null) continues from it. For runs done in parts of bounded length "
        "(null: run to num_steps)."
    )

    @field_validator("resume_from")
    @classmethod
    def _resume_from_needs_resume(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("resume") == "never":
            raise ValueError("resume is 'never': set resume to auto or force to start from this checkpoint")
        return value

    @field_validator("checkpoint_must_save_by", mode="before")
    @classmethod
    def _duration_parses(cls, value: object) -> object:
        if isinstance(value, int):  # YAML 1.1 reads an unquoted 1:30:00 as the base-60 number 5400
            raise ValueError(f"got the number {value}: write the duration as a quoted string, e.g. '01:30:00'")
        if isinstance(value, str):
            parse_duration(value)
        return value


class ValidationConfig(StrictModel):
    every: Annotated[int, Field(ge=0)] = Field(description="Validate every N steps (0 = never).")
    samples_per_prompt: PositiveInt = Field(description="n samples per held-out problem (pass@k needs n >= k).")
    pass_k: list[PositiveInt] = Field(min_length=1, description="k values reported as pass@k.")
    max_items: PositiveInt = Field(description="Held-out problems used per validation (per set: data.validation "
                                   "and each named benchmark).")
    temperature: NonNegativeFloat = Field(description="Sampling temperature at validation.")
    benchmarks: list[Annotated[str, Field(min_length=1)]] = Field(
        description="Named benchmarks (cipo_nemo/eval/registry.py, e.g. [math500, aime24]) validated on besides "
        "data.validation; val/* is the average over the validation sets, val/<name>/* each set's own."
    )

    @field_validator("benchmarks")
    @classmethod
    def _benchmarks_unique(cls, value: list[str]) -> list[str]:
        repeated = sorted({name for name in value if value.count(name) > 1})
        if repeated:
            raise ValueError(f"benchmark(s) {', '.join(repeated)} listed twice")
        return value


def validation_metric_names(validation: ValidationConfig) -> list[str]:
    """The metrics a validation step logs (trainer.validate): the mean reward and pass@k for each k."""
    return ["val/reward_mean", *(f"val/pass@{k}" for k in validation.pass_k)]


def _check_keep_best(checkpointing: CheckpointConfig, validation: ValidationConfig) -> None:
    """keep_best ranks checkpoints by a metric validation computes at the steps they are saved at."""
    metric = checkpointing.keep_best
    if validation.every == 0:
        raise ValueError(f"checkpointing.keep_best is {metric!r} but every is 0: set validation.every > 0 "
                         "(the metric comes from validation) or keep_best to null")
    if metric not in validation_metric_names(validation):
        raise ValueError(f"checkpointing.keep_best {metric!r} is not a validation metric; one of "
                         f"{validation_metric_names(validation)}")
    if checkpointing.save_every == 0 or checkpointing.save_every % validation.every != 0:
        raise ValueError(f"checkpointing.keep_best needs checkpointing.save_every ({checkpointing.save_every}) to be "
                         f"a multiple of every ({validation.every}), so that each periodic checkpoint has the metric")


class MasterConfig(StrictModel):
    run: RunConfig
    grpo: GRPOConfig
    cipo: CorrectionConfig
    loss: LossConfig
    data: DataConfig
    verifier: VerifierConfig
    policy: PolicyConfig
    generation: GenerationConfig
    cluster: ClusterConfig
    refit: RefitConfig
    async_: AsyncConfig = Field(alias="async")  # a Python keyword: cfg.async_ in code, `async:` in YAML
    logger: LoggerConfig
    checkpointing: CheckpointConfig
    validation: ValidationConfig

    model_config = ConfigDict(serialize_by_alias=True)  # config.yaml says `async:` too

    def max_samples_per_step(self) -> int:
        """B x G base rollouts plus, for CIPO, at most min(anchor cap, B x G) anchors x G_c corrections."""
        base = self.grpo.prompts_per_step * self.grpo.samples_per_prompt
        anchors = min(self.cipo.max_anchors_per_step, base) if self.cipo.enabled else 0
        return base + anchors * self.cipo.samples_per_anchor

    def max_optimizer_steps(self) -> int:
        """The learning-rate schedule's length: per RL step, epochs x ceil(samples / train_global_batch_size)
        optimizer steps at the most (correction counts vary, so shorter steps take fewer)."""
        samples = self.max_samples_per_step()
        mini_batch = min(self.policy.train_global_batch_size or samples, samples)
        return self.grpo.num_steps * self.policy.epochs_per_batch * -(-samples // mini_batch)

    # Rules that span sections sit on the later section, so the error names where to change things.
    @field_validator("policy")
    @classmethod
    def _kl_needs_reference(cls, value: PolicyConfig, info: ValidationInfo) -> PolicyConfig:
        loss = info.data.get("loss")
        if loss is not None and loss.kl_beta > 0 and value.reference_policy == "none":
            raise ValueError(f"reference_policy is 'none' but loss.kl_beta = {loss.kl_beta} needs the reference policy")
        return value

    @field_validator("generation")
    @classmethod
    def _overlong_buffer_within_responses(cls, value: GenerationConfig, info: ValidationInfo) -> GenerationConfig:
        grpo = info.data.get("grpo")
        if grpo is not None and grpo.overlong_buffer >= value.max_new_tokens:
            raise ValueError(f"max_new_tokens ({value.max_new_tokens}) must exceed grpo.overlong_buffer "
                             f"({grpo.overlong_buffer}): the punishment starts max_new_tokens - overlong_buffer tokens in")
        return value

    @field_validator("cluster")
    @classmethod
    def _engine_devices_when_apart(cls, value: ClusterConfig, info: ValidationInfo) -> ClusterConfig:
        generation = info.data.get("generation")
        if generation is None or generation.backend != "vllm":
            return value
        if not generation.colocated and value.generation_devices_per_node is None:
            raise ValueError("generation.colocated is false: set generation_devices_per_node (the engines' own "
                             "devices per node)")
        if generation.colocated and value.generation_devices_per_node is not None:
            raise ValueError("generation_devices_per_node is set but generation.colocated is true (the engines share "
                             "the policy's devices): set it to null, or generation.colocated=false")
        return value

    @field_validator("async_")
    @classmethod
    def _overlap_needs_own_devices(cls, value: AsyncConfig, info: ValidationInfo) -> AsyncConfig:
        generation, policy = info.data.get("generation"), info.data.get("policy")
        on_ray = generation is not None and policy is not None and generation.backend == "vllm" and \
            policy.backend == "megatron"
        if value.enabled and value.max_trajectory_age > 0 and on_ray and generation.colocated:
            raise ValueError("max_trajectory_age 1 samples while the policy trains, so the vLLM engines need devices "
                             "of their own: set generation.colocated=false and cluster.generation_devices_per_node")
        return value

    @field_validator("refit")
    @classmethod
    def _transport_fits_the_placement(cls, value: RefitConfig, info: ValidationInfo) -> RefitConfig:
        generation, policy, cluster = (info.data.get(key) for key in ("generation", "policy", "cluster"))
        if value.transport in ("auto", "file") or None in (generation, policy, cluster):
            return value
        if generation.backend != "vllm":
            raise ValueError(f"transport {value.transport!r} streams into vLLM engines, but generation.backend is "
                             f"{generation.backend!r}; use auto or file")
        if value.transport == "ipc" and not generation.colocated:
            raise ValueError("transport 'ipc' hands each engine worker the policy's buffers on the same device: it "
                             "needs generation.colocated: true (broadcast reaches engines on other devices)")
        if value.transport == "ipc" and policy.backend == "hf" and cluster.num_nodes * cluster.devices_per_node > 1:
            raise ValueError("transport 'ipc' with policy.backend hf: the HF policy is one process and feeds one "
                             "engine worker, but the cluster has several devices; use broadcast or file")
        if value.transport == "broadcast" and generation.colocated and cluster.gpu_memory_gib is not None:
            raise ValueError("transport 'broadcast' with engines colocated on GPUs: NCCL cannot join two processes "
                             "of one GPU; use ipc (or auto)")
        return value

    @field_validator("validation")
    @classmethod
    def _validation_is_possible(cls, value: ValidationConfig, info: ValidationInfo) -> ValidationConfig:
        data = info.data.get("data")
        if value.every > 0 and data is not None and data.validation is None and not value.benchmarks:
            raise ValueError("every > 0 but data.validation is null and benchmarks is empty (no held-out set)")
        if max(value.pass_k, default=1) > value.samples_per_prompt:
            raise ValueError(f"pass_k {value.pass_k} needs samples_per_prompt >= {max(value.pass_k)}")
        checkpointing = info.data.get("checkpointing")
        if checkpointing is not None and checkpointing.keep_best is not None:
            _check_keep_best(checkpointing, value)
        return value
