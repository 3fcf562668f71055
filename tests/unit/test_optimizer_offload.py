"""The optimizer's state in host memory while a colocated engine generates (issue 25, item 2: memory order).

This machine has no GPU, so the moves are checked on real tensors between CPU and the meta device standing in for
"elsewhere": what is selected, where each tensor goes and comes back, what stays. torch refuses to swap a CPU
parameter's `.data` for a meta tensor (CPU <-> CUDA it allows, as megatron-core's own offload_to_cpu does it,
optimizer/optimizer.py:566-568), so for the fp32 main copies the selection and the identity-keeping swap are
checked, and their move with a stand-in holder. The trainer's order is checked with a recording policy, the dry
run's choice on the 70B preset (tests/functional/test_loop_memory_order.py runs the loop with the offload on).
"""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cipo_nemo import trainer
from cipo_nemo.__main__ import with_planned_memory_order
from cipo_nemo.config import load_config
from cipo_nemo.models.policy.hf_policy import HFPolicy
from cipo_nemo.models.policy.megatron_worker import MegatronPolicyWorker
from cipo_nemo.models.policy.optimizer_offload import (
    OffloadsOptimizerState,
    OptimizerOffload,
    TensorSlot,
    optimizer_owned_tensors,
    torch_optimizers,
)
from cipo_nemo.plan import plan_launch

CONF = Path(__file__).resolve().parents[2] / "conf"
META = torch.device("meta")


def optimizer_like_megatrons(*, with_main_copy: bool = True):
    """An AdamW holding what megatron's optimizers hold: a model parameter itself (FP32Optimizer), a view of the
    model's storage (the distributed optimizer's fp32 shards of the DDP buffer), an fp32 copy (bf16 training's main
    weights); stepped once, so Adam's moments exist."""
    model = torch.nn.Parameter(torch.randn(8, 4))
    buffer = torch.randn(32)
    shard_view = torch.nn.Parameter(buffer[8:24])
    main_copy = torch.nn.Parameter(torch.randn(6, 3))
    groups = [{"params": [model, shard_view]}] + ([{"params": [main_copy]}] if with_main_copy else [])
    adam = torch.optim.AdamW(groups, lr=0.1)
    for parameter in (model, shard_view, main_copy):
        parameter.grad = torch.ones_like(parameter)
    adam.step()
    return adam, [model, buffer], (model, shard_view, main_copy)


def test_the_optimizer_owns_its_state_and_main_copies_never_the_models_storage():
    adam, model_parameters, (model, shard_view, main_copy) = optimizer_like_megatrons()
    slots = list(optimizer_owned_tensors([adam], model_parameters))
    assert [slot.holder for slot in slots if slot.key is None] == [main_copy]
    state_slots = [(id(slot.holder), slot.key) for slot in slots if slot.key is not None]
    assert sorted(state_slots) == sorted((id(state), key) for state in adam.state.values() for key in state)
    # a main copy moves by its .data: the parameter object, which keys the optimizer state, stays the same
    TensorSlot(main_copy).put(main_copy.data.clone())
    assert set(adam.state) == {model, shard_view, main_copy} and adam.param_groups[1]["params"] == [main_copy]


def test_offload_moves_the_state_and_leaves_the_model():
    adam, model_parameters, (model, shard_view, _) = optimizer_like_megatrons(with_main_copy=False)
    model_before, storage_before = model.detach().clone(), model.untyped_storage().data_ptr()
    states = [t for state in adam.state.values() for t in state.values()]
    offload = OptimizerOffload(host=META)
    assert offload.offload([adam], model_parameters) == sum(t.numel() * t.element_size() for t in states)
    assert all(t.device == META for state in adam.state.values() for t in state.values())
    # the model's own weights and the views of its storage stay, untouched
    assert model.device.type == "cpu" and model.untyped_storage().data_ptr() == storage_before
    assert torch.equal(model, model_before) and shard_view.device.type == "cpu"
    assert {device.type for _, device in offload.moved} == {"cpu"}  # each comes back to where it was
    assert offload.offload([adam], model_parameters) == 0 and len(offload.moved) == len(states)  # twice: no-op


def test_restore_puts_every_offloaded_tensor_back_on_its_device():
    state = {"exp_avg": torch.zeros(5), "step": torch.tensor(3.0)}
    main_copy = SimpleNamespace(data=torch.zeros(2, 2))  # a parameter's .data, without torch's device-type check
    # as offload records them, with meta standing in for the GPU they came from
    offload = OptimizerOffload(moved=[(TensorSlot(state, "exp_avg"), META), (TensorSlot(state, "step"), META),
                                      (TensorSlot(main_copy), META)])
    assert offload.restore() == 5 * 4 + 4 + 4 * 4
    assert state["exp_avg"].device == META and state["step"].device == META and main_copy.data.device == META
    assert offload.moved == [] and offload.restore() == 0


def test_on_a_cpu_machine_both_moves_are_no_ops_and_training_is_unchanged():
    adam, model_parameters, (_, _, main_copy) = optimizer_like_megatrons()
    offload = OptimizerOffload()
    assert offload.offload([adam], model_parameters) == 0 and offload.restore() == 0
    assert main_copy.device.type == "cpu"


class Holder(OffloadsOptimizerState):
    def __init__(self, optimizer, parameters):
        self._optimizer, self._parameters = optimizer, parameters

    def _named_parameters(self):
        return ((str(index), parameter) for index, parameter in enumerate(self._parameters))


def test_policies_offload_through_megatrons_chained_optimizer(monkeypatch):
    assert issubclass(MegatronPolicyWorker, OffloadsOptimizerState) and issubclass(HFPolicy, OffloadsOptimizerState)
    adam, model_parameters, _ = optimizer_like_megatrons(with_main_copy=False)
    chained = SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=adam)])
    assert torch_optimizers(chained) == [adam] and torch_optimizers(adam) == [adam]
    released: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: released.append(True))
    holder = Holder(chained, model_parameters)
    holder._optimizer_offload = OptimizerOffload(host=META)
    assert holder.offload_optimizer() > 0 and released == [True]  # the engine can use what was freed
    assert all(t.device == META for state in adam.state.values() for t in state.values())
    assert Holder(adam, model_parameters).restore_optimizer() == 0  # nothing offloaded yet


class Recorder:
    def __init__(self, calls: list) -> None:
        self.calls = calls

    def __getattr__(self, method: str):
        return lambda *args, **kwargs: self.calls.append(method)


@pytest.mark.parametrize(("setting", "expected"), [(True, ["restore_optimizer", "train", "train",
                                                           "offload_optimizer"]), (False, ["train", "train"])])
def test_the_optimizer_is_on_the_device_exactly_for_the_optimizer_steps(monkeypatch, setting, expected):
    calls: list = []
    cfg = load_config(CONF / "cipo_base.yaml", [f"policy.offload_optimizer_for_generation={str(setting).lower()}"])

    def take_optimizer_steps(policy, batch, plan, loss_fn, *, after_each):
        for planned in plan:
            policy.train(planned)
        return {}

    monkeypatch.setattr(trainer, "take_optimizer_steps", take_optimizer_steps)
    monkeypatch.setattr(trainer, "trained_per_stream", lambda batch, plan: {})
    c = SimpleNamespace(cfg=cfg, policy=Recorder(calls), loss_fn=None,
                        progress=SimpleNamespace(expect=lambda *a: None, advance=lambda: None))
    trainer.train_policy(c, batch=None, plan=[[0, 1], [2, 3]])
    assert calls == expected


def plan(*overrides):
    cfg = load_config(CONF / "cipo_llama3_70b_math.yaml", list(overrides))
    return plan_launch(cfg, base_samples=1024, max_correction_samples=1024)


def offload_line(launch) -> str:
    (line,) = [line for line in launch.lines() if "in host memory while vLLM holds the GPU" in line]
    return line


def test_dry_run_keeps_the_optimizer_where_that_fits_and_moves_it_where_only_that_fits():
    fits = plan()
    assert not fits.memory.optimizer_offloaded and not fits.memory_problems
    assert ": no; peak 71.7 GiB keeping it on the GPU, 59.1 GiB moving it" in offload_line(fits)
    tight = plan("generation.vllm.gpu_memory_utilization=0.6")
    assert tight.memory.optimizer_offloaded and not tight.memory_problems
    assert ": yes; peak 87.6 GiB keeping it on the GPU, 74.9 GiB moving it" in offload_line(tight)
    assert tight.memory.generation == pytest.approx(fits.memory_other.generation + 0.2 * 79.2)


def test_dry_run_refuses_when_neither_fits_and_follows_an_explicit_setting():
    (problem,) = plan("generation.vllm.gpu_memory_utilization=0.75").memory_problems
    assert "exceeds cluster.gpu_memory_gib" in problem and "(99.5 GiB if kept)" in problem
    forced_off = plan("generation.vllm.gpu_memory_utilization=0.6", "policy.offload_optimizer_for_generation=false")
    assert not forced_off.memory.optimizer_offloaded
    assert "with the optimizer's state in host memory while vLLM holds the GPU the peak would be 74.9 GiB" in \
        forced_off.memory_problems[0]
    assert plan("policy.offload_optimizer_for_generation=true").memory.optimizer_offloaded


def test_the_run_gets_the_plans_choice_and_a_cpu_run_keeps_auto_off():
    cfg = load_config(CONF / "cipo_llama3_70b_math.yaml", ["generation.vllm.gpu_memory_utilization=0.6"])
    report = SimpleNamespace(launch=plan("generation.vllm.gpu_memory_utilization=0.6"))
    resolved = with_planned_memory_order(cfg, report)
    assert resolved.policy.offload_optimizer_for_generation is True and trainer.offloads_optimizer(resolved)
    cpu = load_config(CONF / "cipo_smollm2_cpu.yaml")
    launch = plan_launch(cpu, base_samples=32, max_correction_samples=16)
    assert not launch.memory.optimizer_offloaded
    assert not [line for line in launch.lines() if "in host memory while vLLM" in line]  # no GPU budget to fit
    assert not trainer.offloads_optimizer(cpu)  # auto without a plan
