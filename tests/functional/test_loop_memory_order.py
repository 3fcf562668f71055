"""The loop's colocated memory order (issue 16, item 7; the optimizer offload: issue 25) on the real HF backends,
wrapped in recorders: what a colocated vLLM engine and the policy are asked to do, in order, in a step and on
resume."""

from pathlib import Path

import pytest

from cipo_nemo import loop, trainer
from cipo_nemo.config import load_config
from cipo_nemo.models import factory

pytestmark = pytest.mark.slow  # the training loop end to end

BASE = Path(__file__).resolve().parents[2] / "conf" / "cipo_base.yaml"
RECORDED = {"generate", "sleep", "wake", "update_weights_from_path", "get_logprobs", "train", "export_hf_weights_to",
            "remove_exported_weights", "load_checkpoint", "offload_optimizer", "restore_optimizer"}


class Recording:
    """Delegates to the real backend; appends (name, method, tags or level) of the calls that matter here."""

    def __init__(self, name: str, backend, calls: list) -> None:
        self._name, self._backend, self._calls = name, backend, calls

    def __getattr__(self, method: str):
        target = getattr(self._backend, method)
        if method not in RECORDED:
            return target

        def record(*args, **kwargs):
            detail = kwargs.get("tags", kwargs.get("level"))
            self._calls.append((self._name, method, detail))
            return target(*args, **kwargs)

        return record


def _run(arithmetic_model, run_dir: Path, monkeypatch, calls: list, *extra: str) -> None:
    build_policy, build_generation = factory.build_policy, factory.build_generation  # unwrapped originals
    monkeypatch.setattr(trainer, "build_policy", lambda cfg, cluster: Recording("policy", build_policy(cfg, cluster),
                                                                             calls))
    monkeypatch.setattr(trainer, "build_generation",
                        lambda cfg, cluster: Recording("generation", build_generation(cfg, cluster), calls))
    overrides = [
        f"run.output_dir={run_dir}", "grpo.prompts_per_step=2", "grpo.samples_per_prompt=2",
        "cipo.samples_per_anchor=2", "cipo.max_anchors_per_step=2", "cipo.attempt_max_tokens=16",
        "data.train.kind=file", f"data.train.file.path={arithmetic_model.train_file}", "validation.every=0",
        "verifier.num_workers=1", f"policy.model_name={arithmetic_model.model_dir}", "policy.backend=hf",
        "policy.precision=fp32", "policy.micro_batch_size=8", "policy.max_total_sequence_length=256",
        "generation.backend=hf", "generation.max_new_tokens=8", "checkpointing.save_every=1",
        "loss.importance_sampling=true",  # a pi_old pass (get_logprobs) in every step, so its place is checked too
        *extra,
    ]
    components = trainer.setup(load_config(BASE, overrides))
    try:
        loop.train(components)
    finally:
        trainer.shutdown(components)


REFIT = [("policy", "export_hf_weights_to", None), ("generation", "wake", ("weights",)),
         ("generation", "update_weights_from_path", None), ("policy", "remove_exported_weights", None),
         ("generation", "wake", ("kv_cache",))]


def test_step_and_resume_follow_the_colocated_memory_order(arithmetic_model, tmp_path, monkeypatch):
    calls: list = []
    _run(arithmetic_model, tmp_path / "run", monkeypatch, calls, "grpo.num_steps=1")
    first_sleep = calls.index(("generation", "sleep", 2))  # level 2: the refit overwrites every weight
    assert all(method == "generate" for _, method, _ in calls[:first_sleep])
    assert calls[first_sleep + 1:] == [("policy", "get_logprobs", None), ("policy", "train", None), *REFIT]

    calls.clear()
    _run(arithmetic_model, tmp_path / "run", monkeypatch, calls, "grpo.num_steps=2")
    # resume: the engine sleeps while the checkpoint loads, then a refit refills it before step 2 generates
    assert calls[:2 + len(REFIT)] == [("generation", "sleep", 2), ("policy", "load_checkpoint", None), *REFIT]
    assert calls[2 + len(REFIT)][1] == "generate"


def test_an_offloaded_optimizer_is_on_the_device_only_to_train_and_to_load(arithmetic_model, tmp_path, monkeypatch):
    """policy.offload_optimizer_for_generation=true (on CPU the moves themselves are no-ops; the order is the GPU's)."""
    calls: list = []
    offload = "policy.offload_optimizer_for_generation=true"
    _run(arithmetic_model, tmp_path / "run", monkeypatch, calls, "grpo.num_steps=1", offload)
    assert calls[0] == ("policy", "offload_optimizer", None)  # at setup, before the engine starts
    first_sleep = calls.index(("generation", "sleep", 2))
    assert all(method == "generate" for _, method, _ in calls[1:first_sleep])
    assert calls[first_sleep + 1:] == [("policy", "get_logprobs", None), ("policy", "restore_optimizer", None),
                                       ("policy", "train", None), ("policy", "offload_optimizer", None), *REFIT]

    calls.clear()
    _run(arithmetic_model, tmp_path / "run", monkeypatch, calls, "grpo.num_steps=2", offload)
    assert calls[:5 + len(REFIT)] == [("policy", "offload_optimizer", None), ("generation", "sleep", 2),
                                      ("policy", "restore_optimizer", None), ("policy", "load_checkpoint", None),
                                      ("policy", "offload_optimizer", None), *REFIT]
