"""Refit cost at scale (issue 16, item 8): only the rank that writes its node's refit file copies the gathered
weights to host memory; the others drop each gathered tensor on the device."""

import torch

from cipo_nemo.models.policy.megatron_worker import MegatronPolicyWorker


class FakeBridge:
    """Yields HF tensors the way megatron-bridge does: views into one parameter buffer, moved to CPU on request."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors, self.cpu_requests = tensors, []

    def export_hf_weights(self, chunks, *, cpu: bool, show_progress: bool):
        self.cpu_requests.append(cpu)
        for name, tensor in self.tensors.items():
            yield name, tensor.cpu() if cpu else tensor


def test_only_the_writing_rank_copies_the_gathered_weights_to_host_memory():
    """Meta tensors stand for device tensors: any host copy of them raises."""
    worker = object.__new__(MegatronPolicyWorker)
    worker._chunks = []
    on_device = {"a.weight": torch.empty(4, 4, device="meta"), "b.weight": torch.empty(8, device="meta")}
    worker._bridge = FakeBridge(on_device)
    assert worker._gathered_hf_weights(keep=False) == {}  # before the fix: every rank asked for CPU copies
    buffer = torch.arange(1000, dtype=torch.float32)
    worker._bridge = FakeBridge({"a.weight": buffer[:16].view(4, 4), "b.weight": buffer[16:24]})
    kept = worker._gathered_hf_weights(keep=True)
    assert worker._bridge.cpu_requests == [False]
    assert torch.equal(kept["a.weight"], buffer[:16].view(4, 4)) and torch.equal(kept["b.weight"], buffer[16:24])
    # each kept tensor owns exactly its bytes (a view would carry the whole 4000-byte buffer into the refit file)
    assert [t.untyped_storage().nbytes() for t in kept.values()] == [64, 32]
