"""The controller's view of a Megatron policy: one PolicyBackend over a Ray worker group of TP x PP x DP ranks.

Dispatch axes: data is sharded on `dp` (each data-parallel group gets one shard; its TP/PP ranks get the same
shard), and results are taken from one rank per DP group (TP rank 0 on the last pipeline stage). A train batch is
split sample by sample into shards of about equal tokens (`Batch.shard_by_tokens`). The loss denominator is the
trainer's, or computed here over the whole global batch, and handed to every rank, so micro-batch and DP sizes do
not change the step (cipo_nemo/algorithms/loss.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from cipo_nemo.algorithms.loss import PolicyLoss
from cipo_nemo.config.schema import PolicyConfig
from cipo_nemo.data.batch import Batch
from cipo_nemo.distributed import VirtualCluster, WorkerGroup


class MegatronPolicy:
    def __init__(
        self,
        *,
        policy: PolicyConfig,
        cluster: VirtualCluster,
        num_steps: int,
        seed: int,
        resource_fraction: float,
        env_vars: dict[str, str],
        node_cores: list[list[int]] | None = None,
    ) -> None:
        from cipo_nemo.models.policy.megatron_worker import MegatronPolicyWorker

        self._group = WorkerGroup(cluster, MegatronPolicyWorker, name="policy",
                                  init_kwargs={"policy": policy, "num_steps": num_steps, "seed": seed},
                                  resource_fraction=resource_fraction, env_vars=env_vars, node_cores=node_cores)
        infos = self._group.run_all("parallel_info")
        self._dp_rank_of = [info["dp_rank"] for info in infos]
        self._dp_size = infos[0]["dp_size"]
        self._output_rank = {info["dp_rank"]: rank for rank, info in enumerate(infos) if info["is_output_rank"]}

    def get_logprobs(self, batch: Batch) -> torch.Tensor:
        return self._sharded_logprobs("get_logprobs", batch)

    def get_reference_logprobs(self, batch: Batch) -> torch.Tensor:
        return self._sharded_logprobs("get_reference_logprobs", batch)

    def train(self, batch: Batch, loss_fn: PolicyLoss, *, global_denominator: float | None = None) -> dict[str, float]:
        if global_denominator is None:
            global_denominator = float(loss_fn.local_denominator([batch]))  # the whole global batch
        shards = with_inert_padding(batch, self._dp_size).shard_by_tokens(self._dp_size) if self._dp_size > 1 \
            else [batch]
        results = self._group.run_sharded("train", shards, dp_rank_of=self._dp_rank_of, loss_fn=loss_fn,
                                          global_denominator=global_denominator)
        return results[self._output_rank[0]]  # every output rank reports the all-reduced step metrics

    def skip_optimizer_step(self) -> float:
        return self._group.run_all("skip_optimizer_step")[0]

    def export_hf_weights(self) -> dict[str, torch.Tensor]:
        return self._group.run_all("export_hf_weights")[0]  # gathered on global rank 0

    def export_hf_weights_to(self, path: Path) -> int:
        return self._group.run_all("export_hf_weights_to", str(path))[0]  # one file per node

    def remove_exported_weights(self, path: Path) -> None:
        self._group.run_all("remove_exported_weights", str(path))

    def offload_optimizer(self) -> int:
        return sum(self._group.run_all("offload_optimizer"))  # every rank moves its own shard

    def restore_optimizer(self) -> int:
        return sum(self._group.run_all("restore_optimizer"))

    def send_weights(self, message: dict) -> dict | None:
        return self._group.run_all("send_weights", message)[0]  # every rank streams to its device's engine worker

    def open_refit_group(self, name: str, world_size: int, timeout_s: float) -> tuple[str, int]:
        return self._group.run_all("open_refit_group", name, world_size, timeout_s)[0]  # rank 0 sends

    def join_refit_group(self, group: dict) -> None:
        self._group.run_all("join_refit_group", group)

    def save_checkpoint(self, path: Path) -> None:
        self._group.run_all("save_checkpoint", str(path))

    def load_checkpoint(self, path: Path) -> None:
        self._group.run_all("load_checkpoint", str(path))

    def save_hf(self, path: Path) -> None:
        self._group.run_all("save_hf", str(path))

    def shutdown(self) -> None:
        self._group.shutdown()

    def _sharded_logprobs(self, method: str, batch: Batch) -> torch.Tensor:
        # Contiguous slices keep the sample order, so the shards' outputs concatenate back into place.
        bounds = [round(i * len(batch) / self._dp_size) for i in range(self._dp_size + 1)]
        shards = [batch.slice(bounds[d], bounds[d + 1]) for d in range(self._dp_size)]
        results = self._group.run_sharded(method, shards, dp_rank_of=self._dp_rank_of)
        return torch.cat([results[self._output_rank[d]] for d in range(self._dp_size)])


def with_inert_padding(batch: Batch, num_shards: int) -> Batch:
    """`batch` with copies of its shortest sample at advantage 0 appended until every data-parallel rank gets a
    sample (a step whose samples that carry gradient are fewer than the ranks): every rank must take part in the
    step's gradient all-reduce, and a sample at advantage 0 adds exactly 0 to the gradient. The normalizer is the
    trainer's (`global_denominator`), so the copies do not change it."""
    missing = num_shards - len(batch)
    if missing <= 0:
        return batch
    lengths = (batch["prompt_mask"] | batch["response_mask"]).sum(dim=1)
    copies = batch.select([int(lengths.argmin())] * missing)
    copies["advantages"] = torch.zeros_like(copies["advantages"])
    return Batch.concat([batch, copies])
