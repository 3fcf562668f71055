"""Sampling seeds by the prompt's index in the whole call, not in an engine's shard (issue 25, item 2).

RayGeneration splits a call's prompts over its engines; each engine seeded its prompt i from i, so the k-th prompt
of every engine drew from the same random stream (identical prompts in those places got identical samples). Here the
engines run in this process: a vLLM backend whose engine records the SamplingParams it is given (vLLM's sampler
needs the engine processes), and the real HF backend on a tiny model.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from cipo_nemo.config.schema import GenerationConfig, VllmConfig
from cipo_nemo.models.generation.hf_generation import HFGeneration
from cipo_nemo.models.generation.ray_generation import EngineLayout, GenerationWorker, RayGeneration
from cipo_nemo.models.generation.vllm_generation import VllmGeneration
from cipo_nemo.models.interfaces import SamplingSettings
from cipo_nemo.models.tiny import build_tiny_model_dir

SETTINGS = SamplingSettings(n=2, max_new_tokens=12, temperature=1.0, top_p=1.0, stop_strings=(), seed=7)


class RecordingLLM:
    """Stands in for vllm.LLM: answers each request with one token, the seed its SamplingParams carry."""

    def generate(self, prompts, params, use_tqdm=False):
        return [SimpleNamespace(outputs=[SimpleNamespace(index=0, token_ids=[p.seed], finish_reason="length",
                                                         logprobs=[{p.seed: SimpleNamespace(logprob=0.0)}])])
                for p in params]


def recording_vllm_backend() -> VllmGeneration:
    backend = object.__new__(VllmGeneration)
    backend._llm, backend._max_model_len, backend._eos_token_ids = RecordingLLM(), 64, (0,)
    return backend


class InProcessGroup:
    """What WorkerGroup.run_sharded does over Ray actors, on in-process GenerationWorkers (one per rank)."""

    def __init__(self, backends: list) -> None:
        self.workers = []
        for backend in backends:
            worker = object.__new__(GenerationWorker)
            worker.backend = backend
            self.workers.append(worker)

    def run_sharded(self, method, shards, *, dp_rank_of, **kwargs):
        return [getattr(worker, method)(shards[dp], **kwargs) for worker, dp in zip(self.workers, dp_rank_of,
                                                                                    strict=True)]


def ray_generation(backends: list) -> RayGeneration:
    generation = object.__new__(RayGeneration)
    generation.layout = EngineLayout(num_nodes=1, devices_per_node=len(backends), tensor_parallel=1)
    generation._group = InProcessGroup(backends)
    return generation


def seeds_per_prompt(engines: int, prompts: list[list[int]]) -> list[int]:
    responses = ray_generation([recording_vllm_backend() for _ in range(engines)]).generate(prompts, SETTINGS)
    return [samples[0].token_ids[0] for samples in responses]


def test_no_two_prompts_of_a_call_share_a_seed_and_engines_do_not_change_them():
    prompts = [[5, 6, 7]] * 8
    one_engine = seeds_per_prompt(1, prompts)
    assert len(set(one_engine)) == len(prompts)
    for engines in (2, 4):
        assert seeds_per_prompt(engines, prompts) == one_engine


def test_an_offset_call_seeds_as_the_whole_call_would():
    backend = recording_vllm_backend()
    whole = [r[0].token_ids[0] for r in backend.generate([[5, 6]] * 6, SETTINGS)]
    tail = [r[0].token_ids[0] for r in backend.generate([[5, 6]] * 2, dataclasses.replace(SETTINGS,
                                                                                          first_prompt_index=4))]
    assert tail == whole[4:]


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("seeds") / "llama")


def test_identical_prompts_on_two_real_engines_sample_as_on_one(hf_model_dir):
    generation = GenerationConfig(backend="hf", max_new_tokens=12, temperature=1.0, top_p=1.0, stop_strings=[],
                                  colocated=True, vllm=VllmConfig(tensor_parallel=1, gpu_memory_utilization=0.6,
                                                                  cpu_kv_cache_gib=1, dtype="float32",
                                                                  quantization=None, enforce_eager=True,
                                                                  max_num_batched_tokens=None))
    backend = HFGeneration(model_dir=str(hf_model_dir), generation=generation, max_model_len=64, seed=0)
    prompts = [[5, 6, 7, 8]] * 4

    def tokens(responses):
        return [[sample.token_ids for sample in samples] for samples in responses]

    one, two = tokens(backend.generate(prompts, SETTINGS)), tokens(ray_generation([backend, backend]).generate(
        prompts, SETTINGS))
    assert two == one
    assert one[0] != one[2]  # the first prompt of each engine's shard: the same stream before the fix
