"""The bucket protocol of the IPC and broadcast refit transports (models/refit/buckets.py, ipc.py, broadcast.py), on
CPU: buckets shared through torch's reductions (shared memory here, CUDA IPC on a GPU) and broadcast over gloo (NCCL
on GPUs). The reader imitates what vLLM's layerwise reload does with the tensors it is given: it reads one item
ahead and keeps every tensor of a layer until the layer's last tensor has arrived, so a bucket buffer is still read
after the next bucket has come."""

from __future__ import annotations

import gc
import itertools
import multiprocessing
import os
import threading
from collections.abc import Iterator
import torch

from cipo_nemo.models.refit import broadcast, buckets, ipc
from cipo_nemo.models.refit.buckets import shared_memory_mapped_bytes
from cipo_nemo.models.refit.layout import BUCKET_ALIGNMENT, SLOTS, plan_buckets
from cipo_nemo.models.refit.manifest import WeightSyncError

KIB = 1024
BUCKET = 12 * KIB  # q+k fill one bucket, so v (and up, after gate) opens the next: layers straddle buckets


def model_like_tensors(seed: int = 0, *, late_bias: bool = False) -> dict[str, torch.Tensor]:
    """A tiny decoder's HF tensors in export order: an embedding larger than the test's bucket, then layers whose
    q/k/v and gate/up straddle bucket boundaries, in three dtypes. `late_bias` sends layer 1's q bias last, so that
    layer stays incomplete (and its buckets read) until the end, like a layer vLLM processes only at the end."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {"model.embed_tokens.weight": torch.randn(96, 64, generator=generator)}  # 24 KiB
    for layer in range(3):
        prefix = f"model.layers.{layer}"
        for name, shape in (("self_attn.q_proj.weight", (32, 64)), ("self_attn.k_proj.weight", (16, 64)),
                            ("self_attn.v_proj.weight", (16, 64)), ("self_attn.o_proj.weight", (64, 32)),
                            ("mlp.gate_proj.weight", (48, 64)), ("mlp.up_proj.weight", (48, 64)),
                            ("mlp.down_proj.weight", (64, 48)), ("input_layernorm.weight", (64,))):
            tensors[f"{prefix}.{name}"] = torch.randn(shape, generator=generator)
            if layer == 1 and name == "self_attn.q_proj.weight" and not late_bias:
                tensors[f"{prefix}.self_attn.q_proj.bias"] = torch.randn(32, generator=generator).to(torch.bfloat16)
    if late_bias:
        tensors["model.layers.1.self_attn.q_proj.bias"] = torch.randn(32, generator=generator).to(torch.bfloat16)
    tensors["model.norm.weight"] = torch.randn(64, generator=generator).to(torch.float16)
    return tensors


def layer_of(name: str) -> str:
    """The unit vLLM completes at once: fused q/k/v and gate/up are one layer each."""
    module = name.rsplit(".", 1)[0]
    for shard, fused in (("q_proj", "qkv"), ("k_proj", "qkv"), ("v_proj", "qkv"), ("gate_proj", "gate_up"),
                         ("up_proj", "gate_up")):
        module = module.replace(shard, fused)
    return module


def layerwise_reader(buckets: Iterator[list[tuple[str, torch.Tensor]]], expected: dict[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
    """Consume `buckets` as vLLM's chunked reload does: one load call per bucket (reading one item ahead inside
    it, as vLLM's itertools.groupby does), views kept across calls until their layer is complete, then copied out
    ("loaded")."""
    remaining = {}
    for name in expected:
        remaining[layer_of(name)] = remaining.get(layer_of(name), 0) + 1
    pending: dict[str, list[tuple[str, torch.Tensor]]] = {}
    loaded: dict[str, torch.Tensor] = {}

    def load(items: Iterator[tuple[str, torch.Tensor]]) -> None:
        for _, group in itertools.groupby(items, key=lambda item: item[0].split(".")[0]):
            for name, view in group:
                layer = layer_of(name)
                pending.setdefault(layer, []).append((name, view))
                remaining[layer] -= 1
                if remaining[layer] == 0:
                    loaded.update({n: v.clone() for n, v in pending.pop(layer)})

    for bucket in buckets:
        load(iter(bucket))
    return loaded


def raised_message(call) -> str:
    """The WeightSyncError `call` raises, as text; its traceback (which holds the buffers' views) is dropped."""
    try:
        call()
    except WeightSyncError as exc:
        message = str(exc)
    else:
        raise AssertionError("no WeightSyncError")
    gc.collect()
    return message


def run_threads(send, receive) -> tuple[object, object]:
    """send() in a thread, receive() here; both results, the first error raised."""
    result: dict[str, object] = {}

    def sender() -> None:
        try:
            result["sent"] = send()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            result["send_error"] = exc

    thread = threading.Thread(target=sender)
    thread.start()
    try:
        received = receive()
    finally:
        thread.join(timeout=60)
    if "send_error" in result:
        raise result["send_error"]
    return result["sent"], received


# ----------------------------------------------------------------------------------------------- packing rule


def test_a_tensor_larger_than_a_bucket_is_sent_alone_and_the_rest_packed_in_order():
    sizes = [("a", 100), ("b", 3000), ("c", 900), ("d", 300), ("e", 1024), ("f", 1)]
    assert plan_buckets(sizes, bucket_bytes=1024) == [["a"], ["b"], ["c"], ["d"], ["e"], ["f"]]
    # aligned offsets: a (0..100), c starts at 256 and needs 256 + 900 > 1024, so it opens the next bucket
    assert plan_buckets([("a", 100), ("c", 700), ("d", 100)], bucket_bytes=1024) == [["a", "c"], ["d"]]
    assert plan_buckets([("a", 100), ("c", 900)], bucket_bytes=1024) == [["a"], ["c"]]

    tensors = model_like_tensors()
    bucket_bytes = BUCKET
    slots = [ipc.allocate_buffer(bucket_bytes, torch.device("cpu")) for _ in range(2)]
    turn = itertools.cycle(range(2))
    messages = list(buckets.pack_buckets(tensors.items(), bucket_bytes=bucket_bytes,
                                         acquire_slot=lambda device: (slot := next(turn), slots[slot]),
                                         standalone=lambda t: t.reshape(-1).view(torch.uint8)))
    sizes = [(name, t.numel() * t.element_size()) for name, t in tensors.items()]
    assert [[entry.name for entry in m.tensors] for m in messages] == plan_buckets(sizes, bucket_bytes)
    alone = [m for m in messages if m.slot is None]
    assert [m.tensors[0].name for m in alone] == ["model.embed_tokens.weight"]  # 24 KiB > 12 KiB
    for message in messages:
        assert all(entry.offset % BUCKET_ALIGNMENT == 0 for entry in message.tensors)
        assert message.nbytes <= bucket_bytes or message.slot is None


# ----------------------------------------------------------------------------------------------- IPC


def ipc_transfer(tensors, *, bucket_bytes: int, check_name=None):
    channel = ipc.IpcChannel.create(bucket_bytes=bucket_bytes, timeout_s=30)

    def receive():
        receiver = ipc.IpcReceiver(channel, sender_rank=0, check_name=check_name)
        try:
            loaded = layerwise_reader(receiver.buckets(), tensors)
        except BaseException:
            receiver.abort()
            raise
        return loaded, receiver.finish()

    return run_threads(lambda: ipc.send_over_ipc(tensors.items(), channel, sender_rank=0), receive)


def test_ipc_buckets_reach_a_reader_that_keeps_views_intact_with_bounded_shared_memory():
    tensors = model_like_tensors()
    bucket_bytes = BUCKET
    sent, (loaded, engine) = ipc_transfer(tensors, bucket_bytes=bucket_bytes)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    sender = sent["sender"]
    assert sent["engine"] == engine and engine["tensors"] == sender["tensors"] == len(tensors)
    assert sender["alone"] == 1 and sender["buckets"] > 6  # the slots were reused many times
    # what the processes mapped, read from /proc (sender and engine are one process here): the sender's slots plus
    # the embedding sent alone; a layer that spans more buckets than there are slots adds a slot, counted
    largest = tensors["model.embed_tokens.weight"].numel() * 4
    assert sender["slots"] == SLOTS and sender["starved"] == engine["starved"] == 0
    assert sender["peak_buffer_bytes"] <= SLOTS * bucket_bytes + largest
    # measured from /proc (sender and engine are one process here, both map the same segments once each)
    assert 2 * bucket_bytes <= sender["peak_measured_bytes"] <= SLOTS * bucket_bytes + largest
    assert shared_memory_mapped_bytes() == 0  # every segment is gone once both sides are done


def test_a_layer_the_engine_keeps_to_the_end_costs_slots_not_correctness():
    """Layer 1 stays incomplete until the last tensor: the reader keeps views into several buckets, the engine side
    asks for more slots (starved) rather than letting the sender overwrite them, and says how many it took."""
    tensors = model_like_tensors(late_bias=True)
    sent, (loaded, engine) = ipc_transfer(tensors, bucket_bytes=BUCKET)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())
    sender = sent["sender"]
    assert sender["starved"] == engine["starved"] > 0 and sender["slots"] == SLOTS + sender["starved"]
    assert sender["peak_measured_bytes"] <= sender["slots"] * BUCKET + tensors["model.embed_tokens.weight"].numel() * 4


def test_without_the_guard_the_reader_would_see_the_next_buckets_bytes(monkeypatch):
    """The hazard BufferGuard exists for: release a bucket as soon as it has been handed out and the tensors of a
    layer the reader has not completed (here layer 1, until its late bias) are overwritten by later buckets."""
    monkeypatch.setattr(buckets.BufferGuard, "in_use", lambda self, key: False)
    tensors = model_like_tensors(late_bias=True)
    _, (loaded, _) = ipc_transfer(tensors, bucket_bytes=BUCKET)
    assert any(not torch.equal(loaded[name], tensor) for name, tensor in tensors.items())


def test_a_name_the_engine_does_not_have_stops_the_transfer_on_both_sides():
    def check_name(name: str) -> None:
        if name.startswith("model.layers.2."):
            raise WeightSyncError(f"refit: the engine has no parameter for {name}")

    message = raised_message(lambda: ipc_transfer(model_like_tensors(), bucket_bytes=BUCKET, check_name=check_name))
    assert message.startswith("refit: the engine has no parameter for model.layers.2.")
    assert shared_memory_mapped_bytes() == 0  # both sides dropped their buffers


def _send_then_die(channel: ipc.IpcChannel, after_buckets: int) -> None:
    """A policy rank killed mid-transfer: it sends some buckets, then SIGKILLs itself."""
    sent = 0

    def tensors():
        nonlocal sent
        for name, tensor in model_like_tensors().items():
            yield name, tensor
            sent += 1
            if sent > after_buckets * 4:
                os.kill(os.getpid(), 9)

    ipc.send_over_ipc(tensors(), channel, sender_rank=0)


def test_a_sender_killed_mid_transfer_leaves_no_shared_memory_and_the_next_transfer_works():
    shm_before = set(os.listdir("/dev/shm"))
    channel = ipc.IpcChannel.create(bucket_bytes=BUCKET, timeout_s=30)
    process = multiprocessing.get_context("spawn").Process(target=_send_then_die, args=(channel, 3))
    process.start()
    receiver = ipc.IpcReceiver(channel, sender_rank=0)
    received = []

    def receive() -> None:
        try:
            for bucket in receiver.buckets():
                received.extend(name for name, _ in bucket)
        finally:
            receiver.abort()

    assert raised_message(receive).startswith("refit: policy rank 0 closed the channel mid-transfer")
    process.join(timeout=30)
    assert process.exitcode == -9 and len(received) >= 4  # it died mid-transfer, after some tensors arrived
    assert shared_memory_mapped_bytes() == 0
    # torch's segments are unlinked as they are made (other processes of this machine may add files meanwhile)
    assert {name for name in set(os.listdir("/dev/shm")) - shm_before if name.startswith("torch_")} == set()
    tensors = model_like_tensors(seed=1)
    _, (loaded, _) = ipc_transfer(tensors, bucket_bytes=BUCKET)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())


# ----------------------------------------------------------------------------------------------- broadcast (gloo)


def test_broadcast_buckets_over_gloo_reach_a_reader_that_keeps_views_intact():
    tensors = model_like_tensors(seed=2)
    name = f"test-{os.getpid()}"
    host, port = broadcast.open_store(name, world_size=2, timeout_s=60)
    group = broadcast.BroadcastGroup(name=name, host=host, port=port, world_size=2, backend="gloo",
                                     bucket_bytes=BUCKET, timeout_s=60)
    run_threads(lambda: broadcast.join_group(group, rank=0), lambda: broadcast.join_group(group, rank=1))
    try:
        def receive():
            receiver = broadcast.BroadcastReceiver(group, rank=1)
            return layerwise_reader(receiver.buckets(), tensors), receiver.finish()

        sent, (loaded, engine) = run_threads(lambda: broadcast.send_over_broadcast(tensors.items(), group), receive)
    finally:
        broadcast.leave_group(group.name)
    assert all(torch.equal(loaded[n], t) and loaded[n].dtype == t.dtype for n, t in tensors.items())
    assert sent["sender"]["tensors"] == len(tensors) and sent["sender"]["alone"] == 1
    largest = tensors["model.embed_tokens.weight"].numel() * 4
    # the engine worker's own buffers (in shared memory on CPU, so /proc shows them): two slots and the embedding;
    # this process also maps the sender's one buffer
    assert engine["slots"] == 2 and engine["peak_buffer_bytes"] <= 2 * BUCKET + largest
    assert 2 * BUCKET <= engine["peak_measured_bytes"] <= 3 * BUCKET + largest
