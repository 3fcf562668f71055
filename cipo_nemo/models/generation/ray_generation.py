"""Generation engines hosted in Ray actors (colocated with the policy on the same bundles).

One engine per bundle, each a data-parallel replica holding the whole model; prompts are split contiguously over
the engines and the answers concatenated back in order. (vLLM tensor parallelism inside one engine spanning
several bundles is not wired yet: `generation.vllm.tensor_parallel` > 1 is refused at setup.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cipo_nemo.config.schema import GenerationConfig
from cipo_nemo.distributed import VirtualCluster, WorkerGroup
from cipo_nemo.models.interfaces import SampledResponse, SamplingSettings


class GenerationWorker:
    """Runs inside one actor: builds the configured backend there (so vLLM's engine processes are its children)."""

    def __init__(self, *, model_dir: str, generation: GenerationConfig, max_model_len: int, seed: int) -> None:
        from cipo_nemo.models.generation import build_generation_backend

        self.backend = build_generation_backend(model_dir=model_dir, generation=generation,
                                                max_model_len=max_model_len, seed=seed)

    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> list[list[SampledResponse]]:
        return self.backend.generate(prompts, settings) if prompts else []

    def update_weights_from_path(self, path: str) -> int:
        return self.backend.update_weights_from_path(path)

    def sleep(self) -> None:
        self.backend.sleep()

    def wake(self) -> None:
        self.backend.wake()

    def shutdown(self) -> None:
        self.backend.shutdown()


class RayGeneration:
    def __init__(
        self,
        *,
        cluster: VirtualCluster,
        model_dir: Path,
        generation: GenerationConfig,
        max_model_len: int,
        seed: int,
        resource_fraction: float,
        env_vars: dict[str, str],
    ) -> None:
        if generation.vllm.tensor_parallel != 1:
            raise ValueError("generation.vllm.tensor_parallel > 1 is not supported yet: engines are one per device")
        self._group = WorkerGroup(cluster, GenerationWorker, name="generation",
                                  init_kwargs={"model_dir": str(model_dir), "generation": generation,
                                               "max_model_len": max_model_len, "seed": seed},
                                  resource_fraction=resource_fraction, env_vars=env_vars, torch_distributed=False)

    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> list[list[SampledResponse]]:
        engines = self._group.world_size
        bounds = [round(i * len(prompts) / engines) for i in range(engines + 1)]
        shards = [prompts[bounds[e]: bounds[e + 1]] for e in range(engines)]
        results = self._group.run_sharded("generate", shards, dp_rank_of=list(range(engines)), settings=settings)
        return [responses for engine_results in results for responses in engine_results]

    def update_weights_from_path(self, path: Path) -> int:
        return self._group.run_all("update_weights_from_path", str(path))[0]

    def update_weights(self, named_tensors: Any) -> int:
        from cipo_nemo.models.generation.refit import remove_refit_file, save_weights_for_refit

        path = save_weights_for_refit(named_tensors)
        try:
            return self.update_weights_from_path(path)
        finally:
            remove_refit_file(path)

    def sleep(self) -> None:
        self._group.run_all("sleep")

    def wake(self) -> None:
        self._group.run_all("wake")

    def shutdown(self) -> None:
        self._group.shutdown()
