"""The rollout pipeline's schedule, bounds and recovery with stand-in jobs (no workers): which weight version samples
which batch, that the engine is never refit under a batch in flight, that a stalled generator stops the trainer
within async.max_wait_s, that a dead engine is replaced and its batch sampled again with the same inputs, and that a
batch older than max_trajectory_age is refused. The real thing runs in tests/functional/test_async_loop.py."""

from __future__ import annotations

import threading
import time

import pytest

from cipo_nemo.async_rollouts import (
    GenerationStalledError,
    RolloutPipeline,
    SampledBatch,
    StaleBatchError,
    sampling_version,
)


class EngineDied(RuntimeError):
    pass


class FakeRun:
    """A policy version counter, an engine that holds a version, and jobs that sample with it."""

    def __init__(self, *, age: int, num_steps: int = 5, max_wait_s: float = 30.0, max_engine_restarts: int = 2):
        self.engine_holds = 0
        self.sampled: list[tuple[int, int]] = []  # (step, engine version) per finished job
        self.launches: list[int] = []
        self.refits = 0
        self.replacements = 0
        self.die_on: list[int] = []  # steps whose next job dies
        self.block: threading.Event | None = None  # a job waits on it (a stalled engine)
        self.pipeline = RolloutPipeline(
            start_sampling=self.start_sampling, refit=self.refit, replace_engine=self.replace_engine,
            engine_died=lambda error: isinstance(error, EngineDied), max_trajectory_age=age, max_wait_s=max_wait_s,
            max_engine_restarts=max_engine_restarts, num_steps=num_steps)

    def start_sampling(self, step: int):
        self.launches.append(step)
        inputs = f"prompts of step {step}"  # captured at launch, as the trainer captures rho and the sampler

        def job(on_stage):
            on_stage("rollout")
            if self.block is not None:
                self.block.wait()
            time.sleep(0.01)
            if step in self.die_on:
                self.die_on.remove(step)
                raise EngineDied(f"engine core killed while sampling {step}")
            self.sampled.append((step, self.engine_holds))
            return inputs, {"timing/rollout": 0.01}

        return job

    def refit(self) -> None:
        assert not self.pipeline.busy(), "the engine was refit under a batch in flight"
        self.refits += 1
        self.engine_holds = self.pipeline.policy_version

    def replace_engine(self) -> None:
        self.replacements += 1
        self.engine_holds = 0  # a new engine loads the initial weights

    def run(self, steps: range) -> list[SampledBatch]:
        taken = []
        for step in steps:
            taken.append(self.pipeline.take(step))
            self.pipeline.prefetch(step + 1)
            time.sleep(0.02)  # training
            self.pipeline.trained()
        return taken


@pytest.mark.parametrize("age", [0, 1])
def test_batch_s_is_sampled_by_version_s_minus_1_minus_age(age):
    run = FakeRun(age=age)
    taken = run.run(range(1, 6))
    expected = [sampling_version(step, max_trajectory_age=age) for step in range(1, 6)]
    assert expected == ([0, 1, 2, 3, 4] if age == 0 else [0, 0, 1, 2, 3])
    assert [batch.version for batch in taken] == expected
    assert run.sampled == list(zip(range(1, 6), expected))  # the engine really held that version
    assert [batch.rollouts for batch in taken] == [f"prompts of step {step}" for step in range(1, 6)]
    assert run.launches == [1, 2, 3, 4, 5]  # nothing past num_steps
    assert run.refits == (4 if age == 0 else 3)  # each version the engine needs, once (age 1: 1..3)


def test_a_stalled_generator_stops_the_trainer_within_max_wait():
    run = FakeRun(age=1, max_wait_s=0.5)
    run.block = threading.Event()
    started = time.monotonic()
    with pytest.raises(GenerationStalledError) as stalled:
        run.pipeline.take(1)
    assert time.monotonic() - started < 2.0
    message = str(stalled.value)
    assert message.startswith("generation stalled: no batch for step 1 after ")
    assert "async.max_wait_s=0.5" in message and "stage rollout" in message and "weight version 0" in message
    assert "\n" not in message
    run.block.set()


def test_a_dead_engine_is_replaced_and_the_batch_sampled_again_with_the_current_weights():
    run = FakeRun(age=1)
    run.die_on = [3]
    run.run(range(1, 3))  # batch 3 was launched with version 1, during step 2, and its engine died
    batch = run.pipeline.take(3)
    assert run.replacements == 1 and run.pipeline.engine_restarts == 1 and batch.engine_restarts == 1
    # the new engine got the current policy (version 2), and the batch says so: age 0, not 1
    assert (batch.version, batch.rollouts) == (2, "prompts of step 3") and run.sampled[-1] == (3, 2)
    assert run.launches == [1, 2, 3, 3]


def test_an_engine_that_dies_in_its_refit_is_replaced_and_refit():
    run = FakeRun(age=1)
    run.run(range(1, 2))  # step 1 trained; batch 2 (version 0) done
    real_refit, deaths = run.refit, ["once"]

    def dying_refit() -> None:
        if deaths:
            deaths.pop()
            raise EngineDied("engine core killed during the refit")
        real_refit()

    run.pipeline._refit = dying_refit
    taken = run.run(range(2, 4))
    assert run.replacements == 1 and run.pipeline.engine_restarts == 1
    assert [batch.version for batch in taken] == [0, 1]  # the schedule holds: the refit was done again


def test_a_refit_that_hangs_stops_the_trainer_within_max_wait():
    run = FakeRun(age=1, max_wait_s=0.5)
    run.run(range(1, 2))
    run.pipeline._refit = lambda: time.sleep(5)
    run.pipeline.take(2)
    with pytest.raises(GenerationStalledError, match=r"the engine's refit to weight version 1 took longer than "
                                                     r"async.max_wait_s=0.5 s"):
        run.pipeline.prefetch(3)


def test_a_death_beyond_max_engine_restarts_is_raised_naming_the_batch_and_stage():
    run = FakeRun(age=1, max_engine_restarts=1)
    run.die_on = [1, 1]
    with pytest.raises(EngineDied) as died:
        run.pipeline.take(1)
    assert died.value.during == "sampling batch 1, stage rollout"
    assert run.replacements == 1


def test_an_error_of_the_sampling_thread_is_raised_in_the_trainers_thread():
    run = FakeRun(age=1)

    def failing(step):
        def job(on_stage):
            on_stage("verify")
            raise ValueError("the verifier broke")
        return job

    run.pipeline._start_sampling = failing
    with pytest.raises(ValueError, match="the verifier broke") as failed:
        run.pipeline.take(1)
    assert failed.value.during == "sampling batch 1, stage verify" and run.replacements == 0


def test_the_batch_sampled_ahead_goes_into_the_checkpoint_and_a_resume_trains_it_first():
    run = FakeRun(age=1)
    run.run(range(1, 3))  # after step 2: batch 3 in flight (version 1)
    state = run.pipeline.state_dict()  # waits for it
    assert not run.pipeline.busy() and state["ready"].step == 3 and state["ready"].version == 1

    resumed = FakeRun(age=1)
    resumed.engine_holds = 2  # the resumed run refits its engine to the checkpoint's policy
    resumed.pipeline.load_state_dict(state, policy_version=2)
    taken = resumed.run(range(3, 6))
    assert [batch.version for batch in taken] == [1, 2, 3]  # what the uninterrupted run trains on
    assert resumed.launches == [4, 5] and resumed.refits == 1  # batch 3 is not sampled again


def test_a_batch_older_than_max_trajectory_age_is_refused():
    run = FakeRun(age=0)
    stale = SampledBatch(step=3, version=1, rollouts=None, timings={})
    run.pipeline.load_state_dict({"ready": stale}, policy_version=2)  # an age-1 checkpoint resumed with age 0
    with pytest.raises(StaleBatchError, match="batch 3 was sampled by weight version 1, 1 versions behind"):
        run.pipeline.take(3)


def test_validation_gets_an_idle_engine_with_the_current_weights():
    run = FakeRun(age=1)
    run.run(range(1, 3))
    run.pipeline.engine_current()
    assert not run.pipeline.busy() and run.engine_holds == 2
    assert run.pipeline.take(3).version == 1  # the batch in flight was kept


def test_a_replaced_engine_gets_a_refit_transport_of_its_own(monkeypatch):
    """Broadcast's process group holds the engine workers of its start: the dead engine's transport closes with it,
    and the new engine gets a new one (async_loop.replace_generation_engine through trainer.connect_refit)."""
    from types import SimpleNamespace

    import cipo_nemo.async_loop as async_loop
    import cipo_nemo.trainer as trainer

    events: list[str] = []

    class Transport:
        def __init__(self, engine: str) -> None:
            self.engine = engine

        def close(self) -> None:
            events.append(f"close transport of {self.engine}")

    class Engine:
        def __init__(self, name: str) -> None:
            self.name = name

        def shutdown(self, timeout_s: float | None = None) -> None:
            events.append(f"shutdown {self.name} within {timeout_s} s")

    def build_transport(refit, policy, generation, *, on_gpu, colocated):
        events.append(f"transport to {generation.name}")
        return Transport(generation.name)

    monkeypatch.setattr(async_loop, "build_generation", lambda cfg, cluster: Engine("new engine"))
    monkeypatch.setattr(trainer, "build_refit_transport", build_transport)
    cfg = SimpleNamespace(refit=None, generation=SimpleNamespace(colocated=False))
    run = SimpleNamespace(cfg=cfg, cluster=None, policy=None, generation=Engine("dead engine"),
                          refit_transport=Transport("dead engine"))
    async_loop.replace_generation_engine(run)
    assert events == ["close transport of dead engine", f"shutdown dead engine within {trainer.QUICK_SHUTDOWN_S} s",
                      "transport to new engine"]
    assert run.refit_transport.engine == "new engine" and run.generation.name == "new engine"
