"""cpu_compat skips megatron's DDP-buffer all-gather / reduce-scatter on one-rank groups (the identity there) and
passes every other call to torch.distributed unchanged. The training numbers at DP 1 with the distributed optimizer
are checked against HF in test_megatron_policy.py; this file checks the switch itself."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.functional.multirank import run_on_ranks

pytestmark = pytest.mark.slow  # Megatron ranks (gloo)


def _buffer_collectives(rank: int, world_size: int) -> dict[str, Any]:
    from cipo_nemo.models.policy import cpu_compat

    cpu_compat.apply_cpu_compat()
    import megatron.core.distributed.param_and_grad_buffer as buffers

    buffer = torch.arange(8, dtype=torch.float32)
    shard = buffer.view(world_size, -1)[rank]  # the distributed optimizer's view of this rank's shard
    original = buffer.clone()
    if world_size == 1:
        calls = []

        def spy(output: torch.Tensor, input: torch.Tensor, **kwargs: Any) -> str:
            calls.append(kwargs)
            return "ran"

        skipping = cpu_compat._identity_for_one_rank(spy)
        aliased = skipping(buffer, shard, group=None)
        separate_output = torch.zeros(8)
        skipping(separate_output, buffer, group=None, op=dist.ReduceOp.SUM)
        asynchronous = skipping(buffer, shard, group=None, async_op=True)
        buffers.dist_all_gather_func(buffer, shard, group=None)
        buffers.dist_reduce_scatter_func(shard, buffer, group=None)
        return {"patched": [getattr(f, "_one_rank_identity", False) for f in
                            (buffers.dist_all_gather_func, buffers.dist_reduce_scatter_func)],
                "aliased_result": aliased, "async_result": asynchronous, "spy_calls": len(calls),
                "separate_output": separate_output, "buffer_unchanged": torch.equal(buffer, original)}
    # two ranks: the patched functions still gather and reduce
    gathered = torch.zeros(8)
    buffers.dist_all_gather_func(gathered, (shard + 100 * rank).contiguous(), group=None)
    reduced = torch.zeros(8 // world_size)
    buffers.dist_reduce_scatter_func(reduced, buffer.clone(), group=None)
    return {"gathered": gathered, "reduced": reduced}


def test_one_rank_buffer_collectives_are_skipped_and_others_run() -> None:
    (alone,) = run_on_ranks(_buffer_collectives, world_size=1)
    assert alone["patched"] == [True, True]
    # a one-rank synchronous call never reaches the collective; the output holds the input
    assert alone["aliased_result"] is None and alone["buffer_unchanged"]
    assert torch.equal(alone["separate_output"], torch.arange(8, dtype=torch.float32))
    # an asynchronous one does (its caller waits on the returned work)
    assert alone["async_result"] == "ran" and alone["spy_calls"] == 1

    rank0, rank1 = run_on_ranks(_buffer_collectives, world_size=2)
    expected_gather = torch.tensor([0.0, 1, 2, 3, 104, 105, 106, 107])
    assert torch.equal(rank0["gathered"], expected_gather) and torch.equal(rank1["gathered"], expected_gather)
    assert torch.equal(rank0["reduced"], torch.tensor([0.0, 2, 4, 6]))
    assert torch.equal(rank1["reduced"], torch.tensor([8.0, 10, 12, 14]))
