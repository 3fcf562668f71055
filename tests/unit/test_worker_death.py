"""A worker that dies becomes one exception type, one driver line and exit code 75 (70 past cluster.max_restarts),
without Ray: the error mapping, the dead-engine watch over a real child process, and the restart ledger.
The real stack's drill (a SIGKILLed vLLM engine core) is tests/functional/test_loop_stack.py."""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import pytest
from ray.exceptions import ActorDiedError, RayTaskError

from cipo_nemo.config import load_config
from cipo_nemo.distributed.worker_group import (
    WorkerDiedError,
    WorkerError,
    _RemoteFailure,
    _WorkerHost,
    means_process_death,
    worker_error_of,
)
from cipo_nemo.models.generation.engine_watch import EngineWatch
from cipo_nemo.models.generation.ray_generation import GenerationWorker
from cipo_nemo.loop import REQUEUE_EXIT_CODE
from cipo_nemo.utils.checkpoint import CheckpointManager
from cipo_nemo.utils.restarts import RESTARTS_EXHAUSTED_EXIT_CODE, RESTARTS_FILE, after_worker_death, worker_deaths

BASE = Path(__file__).resolve().parents[2] / "conf" / "cipo_base.yaml"
WHERE = "node 10.1.2.3, placement group 0, bundle 0, pid 4242"


class EngineDeadError(Exception):
    """Stands in for vllm.v1.engine.exceptions.EngineDeadError: the mapping goes by type name."""


class _DeadEngineWorker:
    process_death_errors = GenerationWorker.process_death_errors

    def generate(self) -> None:
        raise EngineDeadError("EngineCore encountered an issue.")

    def wrapped(self) -> None:
        try:
            self.generate()
        except EngineDeadError as exc:
            raise RuntimeError("generation failed") from exc

    def bug(self) -> None:
        raise ValueError("a plain bug")


def _remote_failure_of(method: str) -> _RemoteFailure:
    host = _WorkerHost()
    host.worker = _DeadEngineWorker()
    with pytest.raises(_RemoteFailure) as caught:
        host.call(method)
    return caught.value


def _mapped(cause: _RemoteFailure) -> WorkerError:
    task_error = RayTaskError("generate", "remote traceback", cause)
    return worker_error_of(task_error, group="generation", rank=0, where=WHERE, method="generate")


def test_engine_death_inside_the_actor_is_a_worker_death():
    error = _mapped(_remote_failure_of("generate"))
    assert isinstance(error, WorkerDiedError)
    assert "EngineDeadError" in error.summary() and WHERE in error.summary()
    # raised from (or while handling) the engine's death counts too
    assert isinstance(_mapped(_remote_failure_of("wrapped")), WorkerDiedError)


def test_a_plain_exception_stays_a_worker_error():
    error = _mapped(_remote_failure_of("bug"))
    assert type(error) is WorkerError
    assert "ValueError: a plain bug" in str(error)


def test_a_dead_actor_is_a_worker_death():
    error = worker_error_of(ActorDiedError(), group="policy", rank=1, where=WHERE, method="train")
    assert isinstance(error, WorkerDiedError)
    assert error.summary().startswith(f"worker group 'policy' rank 1 ({WHERE}) died in train: the actor died")


def test_means_process_death_follows_the_cause_chain():
    try:
        try:
            raise EngineDeadError()
        except EngineDeadError:
            raise KeyError("while handling")  # __context__
    except KeyError as exc:
        assert means_process_death(exc, ("EngineDeadError",))
        assert not means_process_death(exc, ("OtherError",))
    assert not means_process_death(ValueError(), ())


def _death(detail: str = "a process of the worker died (EngineDeadError: line one\nline two)") -> WorkerDiedError:
    return WorkerDiedError(group="generation", rank=0, where=WHERE, method="generate", detail=detail,
                           remote_traceback="Traceback ...\n  many lines\n")


def test_the_driver_line_requeues_until_max_restarts_then_gives_up(tmp_path):
    cfg = load_config(BASE, [f"run.output_dir={tmp_path}", "cluster.max_restarts=1"])
    checkpoint = CheckpointManager(tmp_path / "checkpoints", keep_last=2).save(1, lambda directory: None)

    line, code = after_worker_death(cfg, _death().summary(), requeue_exit_code=REQUEUE_EXIT_CODE)
    assert code == REQUEUE_EXIT_CODE
    assert "\n" not in line
    assert line.startswith(f"worker died: worker group 'generation' rank 0 ({WHERE}) died in generate: ")
    assert f"last complete checkpoint {checkpoint};" in line
    assert line.endswith("restart 1 of cluster.max_restarts=1; exit code 75: rerun the same command to resume")

    # the requeued run's worker dies again
    line, code = after_worker_death(cfg, _death().summary(), requeue_exit_code=REQUEUE_EXIT_CODE)
    assert code == RESTARTS_EXHAUSTED_EXIT_CODE != REQUEUE_EXIT_CODE
    assert "not restarting: 2 worker deaths, cluster.max_restarts=1 restarts allowed; exit code 70" in line
    assert worker_deaths(tmp_path) == 2 and (tmp_path / RESTARTS_FILE).is_file()


def test_the_line_names_the_step_and_stage_and_a_stall_counts_as_a_restart(tmp_path):
    cfg = load_config(BASE, [f"run.output_dir={tmp_path}", "cluster.max_restarts=2"])
    death = _death("the actor died")
    death.during = "step 3, stage train"  # set by the loop
    line, _ = after_worker_death(cfg, death.summary(), requeue_exit_code=REQUEUE_EXIT_CODE)
    assert line.startswith(f"worker died: worker group 'generation' rank 0 ({WHERE}) died in generate (step 3, stage "
                           "train): the actor died; ")
    line, code = after_worker_death(cfg, "no batch for step 4 after 20 s (step 4, stage wait_for_rollouts)",
                                    requeue_exit_code=REQUEUE_EXIT_CODE, what="generation stalled")
    assert code == REQUEUE_EXIT_CODE and line.startswith("generation stalled: no batch for step 4 after 20 s")
    assert "restart 2 of cluster.max_restarts=2" in line


def test_no_restarts_allowed_and_no_checkpoint_yet(tmp_path):
    cfg = load_config(BASE, [f"run.output_dir={tmp_path}", "cluster.max_restarts=0"])
    line, code = after_worker_death(cfg, _death("the actor died").summary(), requeue_exit_code=REQUEUE_EXIT_CODE)
    assert code == RESTARTS_EXHAUSTED_EXIT_CODE
    assert "no complete checkpoint yet (step 0)" in line


def _sleep_forever() -> None:
    time.sleep(600)


def _client_with_engine_process() -> tuple[SimpleNamespace, multiprocessing.Process]:
    process = multiprocessing.get_context("spawn").Process(target=_sleep_forever, name="EngineCore", daemon=True)
    process.start()
    resources = SimpleNamespace(engine_manager=SimpleNamespace(processes=[process]), engine_dead=False)
    return SimpleNamespace(resources=resources, outputs_queue=queue.Queue(), utility_results={}), process


def test_engine_watch_wakes_the_call_in_flight_when_the_engine_process_dies():
    client, process = _client_with_engine_process()
    pending: Future = Future()
    client.utility_results[7] = pending  # a collective_rpc waiting for its answer
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(client.outputs_queue.get()), daemon=True)
    waiter.start()  # a generate waiting for outputs
    watch = EngineWatch(client, make_error=EngineDeadError)
    process.kill()
    waiter.join(timeout=30)
    assert got and isinstance(got[0], EngineDeadError)
    assert isinstance(pending.exception(timeout=30), EngineDeadError)
    assert client.resources.engine_dead
    assert "EngineCore" in watch.died and "exit code -9" in watch.died


def test_engine_watch_ignores_a_planned_shutdown():
    client, process = _client_with_engine_process()
    watch = EngineWatch(client, make_error=EngineDeadError)
    watch.stop()
    process.kill()
    process.join(timeout=30)
    time.sleep(0.5)
    assert client.outputs_queue.empty() and not client.resources.engine_dead and watch.died is None
