"""A dead vLLM engine core must fail the call in flight, not hang it.

`vllm.LLM` runs its EngineCore in a child process and talks to it through a synchronous client (vLLM 0.32:
`SyncMPClient`). When that process dies (OOM kill, segfault, SIGKILL), vLLM's own monitor thread marks the engine
dead and shuts the client down, but a caller already waiting for outputs (`get_output` on the output queue) or for
a utility result (`collective_rpc`, a Future) is never woken: the output thread stops without queueing an error.
Measured (tests/functional/test_engine_death.py with the watch off): a generate was still blocked 60 s after the
SIGKILL. Later calls do raise EngineDeadError at once (`ensure_alive`).

`EngineWatch` waits on the engine processes' sentinels and, on an unexpected exit, marks the engine dead, puts an
EngineDeadError on the output queue and fails every pending utility future with it, so the call in flight raises
EngineDeadError too. The generation actor declares that error a process death (`process_death_errors`), and the
driver turns it into a requeue.
"""

from __future__ import annotations

import logging
import threading
from multiprocessing import connection
from typing import Any

logger = logging.getLogger(__name__)


class EngineWatch:
    """Watches the engine core processes of one synchronous vLLM client; `stop()` before a planned shutdown."""

    def __init__(self, client: Any, *, make_error: Any) -> None:
        self._client = client
        self._make_error = make_error  # () -> the exception waiters get (vLLM's EngineDeadError)
        self._stopping = threading.Event()
        self.died: str | None = None  # "<process name> exit code N" once an engine process died unexpectedly
        manager = getattr(getattr(client, "resources", None), "engine_manager", None)
        processes = list(getattr(manager, "processes", []) or [])
        if not processes or not hasattr(client, "outputs_queue") or not hasattr(client, "utility_results"):
            logger.warning("vLLM client %s has no engine processes to watch: a dead engine core may hang the call "
                           "in flight", type(client).__name__)
            self._thread = None
            return
        self._thread = threading.Thread(target=self._watch, args=(processes,), name="cipo-engine-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """The engine is about to be shut down on purpose: its processes' exits are not deaths."""
        self._stopping.set()

    def _watch(self, processes: list[Any]) -> None:
        by_sentinel = {process.sentinel: process for process in processes}
        ended = [by_sentinel[sentinel] for sentinel in connection.wait(list(by_sentinel))]
        if self._stopping.is_set():
            return
        for process in ended:
            process.join(timeout=1.0)  # reaped, so exitcode is known (vLLM's own monitor may be reaping it too)
        self.died = ", ".join(f"{process.name} (pid {process.pid}) exit code {process.exitcode}" for process in ended)
        logger.error("vLLM engine process died: %s; failing the call in flight", self.died)
        self.fail_waiters()

    def fail_waiters(self) -> None:
        """Wake every caller waiting on the engine with the error (and make later calls raise it: engine_dead)."""
        self._client.resources.engine_dead = True
        self._client.outputs_queue.put_nowait(self._make_error())
        for future in list(self._client.utility_results.values()):
            if not future.done():
                future.set_exception(self._make_error())
