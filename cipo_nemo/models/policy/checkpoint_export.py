"""A training checkpoint (RUN_DIR/checkpoints/step_N) as a Hugging Face model directory, written on one process.

Megatron checkpoints (dist_checkpointing, saved at any TP/PP/DP layout) load resharded into a TP1/PP1 model that
megatron-bridge builds from the run's base model config (no HF weights read, no optimizer, no DDP buffers);
megatron-bridge then maps the weights to HF names, and they are written as the policy's `save_hf` writes them
(hf_directory.py). The model is built in host memory with megatron's local layer spec whatever spec trained it:
a whole 70B model does not fit one GPU (141 GB in bf16), and Transformer Engine may be absent where the export
runs. The checkpoint's keys are the same for both specs: megatron-core's local spec saves its separate norms under
the fused Transformer Engine names (`sharded_state_dict_keys_map`, models/gpt/gpt_layer_specs.py:459-462:
`input_layernorm.` -> `self_attention.linear_qkv.layer_norm_`, `pre_mlp_layernorm.` ->
`mlp.linear_fc1.layer_norm_`), and the Transformer Engine modules' `_extra_state` entries (FP8 scaling state) are
not asked for, which dist_checkpointing.load allows (strict=ASSUME_OK_UNEXPECTED,
dist_checkpointing/serialization.py:74). HF-backend checkpoints (policy/policy.pt) load into the HF policy and are
written by its `save_hf`. Either way the run's base model (`policy.model_name` in the checkpoint's config.yaml) must
still be readable: it gives the architecture, the HF config and the tokenizer files.

The output directory is written under a temporary name beside it and renamed when complete, so a failed export
leaves nothing that looks like a model. `export_checkpoint_isolated` runs the export in a fresh process: Megatron's
CPU patches (cpu_compat.py) and process groups stay out of the caller (the evaluation harness samples from the
export afterwards in its own process).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import multiprocessing
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from pydantic import ValidationError

from cipo_nemo.config import ConfigError, resolve
from cipo_nemo.config.schema import PolicyConfig
from cipo_nemo.models.hub import ModelNotFoundError, cache_root, find_local_model_dir
from cipo_nemo.utils.checkpoint import COMPLETE_MARKER, CONFIG_FILE, POLICY_DIR, checkpoint_problem

logger = logging.getLogger(__name__)

EXPORTS_DIR = "exports"  # under cache_root(): exports made for `cipo_nemo.eval --model CHECKPOINT`
# policy keys added after checkpoints were first exported: a checkpoint without one reads the base config's value
# (shipped inside the package)
POLICY_KEYS_ADDED_SINCE = ("offload_optimizer_for_generation",)
BASE_CONFIG = Path(__file__).resolve().parents[2] / "conf" / "cipo_base.yaml"


class ExportError(ValueError):
    """A checkpoint that cannot be exported as asked; the message (one line) says why."""


def export_checkpoint(checkpoint: Path, out_dir: Path) -> Path:
    """Write the policy weights of `checkpoint` as an HF directory `out_dir` (absent or empty); returns it."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    policy = checkpoint_policy(checkpoint)
    check_output_dir(out_dir)
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        if policy.backend == "megatron":
            export_megatron(policy, checkpoint / POLICY_DIR, staging)
        else:
            export_hf(policy, checkpoint / POLICY_DIR, staging)
        os.replace(staging, out_dir)  # over an empty directory too (rename(2) allows it)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("exported %s (%s, TP %d x PP %d) -> %s", checkpoint, policy.backend,
                policy.megatron.tensor_parallel, policy.megatron.pipeline_parallel, out_dir)
    return out_dir


def checkpoint_policy(checkpoint: Path) -> PolicyConfig:
    """The `policy` section of a complete checkpoint's config.yaml, its base model present; else ExportError.

    Only that section is validated (with the base config's values of POLICY_KEYS_ADDED_SINCE where it lacks them): a
    checkpoint written before a config key was added still exports."""
    problem = checkpoint_problem(checkpoint)
    if problem is not None:
        raise ExportError(problem)
    config_file = checkpoint / CONFIG_FILE
    try:
        container, _ = resolve(config_file)
        section = container.get("policy") if isinstance(container, dict) else None
        if isinstance(section, dict):
            defaults = resolve(BASE_CONFIG)[0]["policy"]
            section = {key: defaults[key] for key in POLICY_KEYS_ADDED_SINCE} | section
        policy = PolicyConfig.model_validate(section)
    except ConfigError as error:
        raise ExportError(f"{config_file}: {str(error).splitlines()[0]}") from None
    except ValidationError as error:
        problems = "; ".join(f"policy.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()[:3])
        raise ExportError(f"{config_file}: not a readable policy config: {problems}") from None
    # directories, as the factory hands them to the workers (nothing is looked up on the hub from here on)
    model_dir = _local_model_dir(policy.model_name, "policy.model_name", config_file, revision=policy.model_revision)
    resolved = {"model_name": str(model_dir), "model_revision": None}
    if policy.tokenizer is not None:
        resolved["tokenizer"] = str(_local_model_dir(policy.tokenizer, "policy.tokenizer", config_file))
    return policy.model_copy(update=resolved)


def _local_model_dir(name: str, key: str, config_file: Path, *, revision: str | None = None) -> Path:
    """The run's base model (or tokenizer) directory, which gives the export its HF config and tokenizer files.
    Never downloads: it is where the run found it (a directory or the Hugging Face cache)."""
    try:
        found = find_local_model_dir(name, revision, key=key)
    except ModelNotFoundError as error:
        found, reason = None, str(error).removeprefix(f"{key}: ")
    else:
        reason = "it is neither a local directory nor in the offline cache"
    if found is None:
        raise ExportError(f"{config_file}: the run's {key}={name!r} is needed for the HF config and tokenizer, "
                          f"but {reason}")
    return found


def check_output_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ExportError(f"{out_dir} exists and is not empty; pass a new or empty directory")


# ----- the two backends ----------------------------------------------------------------------------------------


def export_megatron(policy: PolicyConfig, policy_dir: Path, out_dir: Path) -> None:
    """Load the dist_checkpointing model state at TP1/PP1 on this one process, in host memory, and write it through
    the bridge."""
    from cipo_nemo.models.policy.hf_directory import write_hf_directory
    from cipo_nemo.models.policy.megatron_setup import build_megatron_model, init_parallel_state
    from cipo_nemo.models.policy.megatron_worker import FULLY_RESHARDABLE

    single = single_process_policy(policy)
    with one_process_world():
        init_parallel_state(megatron_cfg=single.megatron, seed=0)
        from megatron.core import dist_checkpointing, parallel_state
        from megatron.core.utils import unwrap_model

        try:
            model = build_megatron_model(policy_cfg=single, for_training=False, on_host=True)
            (module,) = [unwrap_model(chunk) for chunk in model.chunks]
            metadata = {**FULLY_RESHARDABLE,
                        "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
            # only the model's tensors are read; the optimizer state in the checkpoint is left alone
            state = dist_checkpointing.load({"model": module.sharded_state_dict(metadata=metadata)}, str(policy_dir))
            module.load_state_dict(state["model"])
            weights = dict(model.bridge.export_hf_weights(model.chunks, cpu=True, show_progress=False))
            write_hf_directory(out_dir, weights, bridge=model.bridge, tokenizer=policy.tokenizer)
        finally:
            parallel_state.destroy_model_parallel()


def single_process_policy(policy: PolicyConfig) -> PolicyConfig:
    """The checkpoint's policy at TP1/PP1 on megatron's local layer spec, with nothing that only matters for
    training speed (recompute, FP8, sequence parallelism, Transformer Engine): the weights do not depend on them."""
    megatron = policy.megatron.model_copy(update={"tensor_parallel": 1, "pipeline_parallel": 1,
                                                  "sequence_parallel": False, "activation_recompute": False,
                                                  "fp8": None, "layer_spec": "local"})
    return policy.model_copy(update={"megatron": megatron})


@contextlib.contextmanager
def one_process_world() -> Iterator[None]:
    """A gloo torch.distributed world of this process alone (megatron's groups and dist_checkpointing need one;
    the model is in host memory, so not NCCL even where CUDA exists), destroyed afterwards; the environment
    variables it needed are put back."""
    import torch.distributed as dist

    if dist.is_initialized():
        raise ExportError("export runs on a process of its own; torch.distributed is already initialized here "
                          "(use export_checkpoint_isolated)")
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    try:
        dist.init_process_group("gloo")
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def export_hf(policy: PolicyConfig, policy_dir: Path, out_dir: Path) -> None:
    """The HF policy's checkpoint (weights, optimizer, schedule) loaded and written by its own save_hf."""
    from cipo_nemo.models.policy.hf_policy import CHECKPOINT_FILE, HFPolicy

    if not (policy_dir / CHECKPOINT_FILE).is_file():
        raise ExportError(f"{policy_dir} has no {CHECKPOINT_FILE}: not an HF-backend checkpoint, though its "
                          "config says policy.backend=hf")
    hf_policy = HFPolicy(policy=policy, num_steps=1, seed=0)
    try:
        hf_policy.load_checkpoint(policy_dir)
        hf_policy.save_hf(out_dir)
    finally:
        hf_policy.shutdown()


# ----- for the evaluation harness ------------------------------------------------------------------------------


def export_checkpoint_isolated(checkpoint: Path, out_dir: Path) -> Path:
    """`export_checkpoint` in a fresh (spawned) process; its ExportError is raised here."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(export_checkpoint, Path(checkpoint), Path(out_dir)).result()


def cached_export(checkpoint: Path) -> Path:
    """The HF export of `checkpoint` in the cache (cache_root()/exports), made once per checkpoint: the key is its
    resolved path and the time its COMPLETE marker was written (a step saved again gets a new export)."""
    checkpoint = Path(checkpoint).resolve()
    problem = checkpoint_problem(checkpoint)
    if problem is not None:
        raise ExportError(problem)
    written = (checkpoint / COMPLETE_MARKER).stat().st_mtime_ns
    key = hashlib.sha256(f"{checkpoint}\0{written}".encode()).hexdigest()[:16]
    target = cache_root() / EXPORTS_DIR / f"{checkpoint.parent.parent.name}-{checkpoint.name}-{key}"
    if (target / "config.json").is_file():
        logger.info("reusing the export of %s at %s", checkpoint, target)
        return target
    logger.info("exporting %s to %s (once; later evaluations reuse it)", checkpoint, target)
    export_checkpoint_isolated(checkpoint, target)
    return target
