"""A process pool that gives each worker one job at a time with a wall-clock deadline, and kills what overruns it.

Shared by the math verifier (cipo_nemo/environments/math_pool.py) and user reward functions
(cipo_nemo/environments/custom_reward.py): both run code that may hang or crash on some input, and neither may stall
or crash the training loop.

Design: a stuck call (a sympy simplification, a user function in an endless loop) cannot be interrupted from outside
its process (no signal.alarm off the main thread, and a concurrent.futures future that is already running cannot be
cancelled). So the pool owns its worker processes directly, one duplex Pipe each, and gives each worker one job at a
time with a deadline. When a deadline passes the parent SIGKILLs that worker, records "timeout" for its job, and
starts a replacement; the other workers keep going. Deadlines start only once a worker has reported "ready" (its
warm-up done: imports, caches), so start-up time never counts against a job.

Start method: "forkserver" (with modules preloaded where given) where available, else "spawn". Never "fork": the
trainer process holds CUDA contexts and threads (Ray, NCCL, tokenizers), and forking those is undefined behaviour.
Spawned and forkserver children inherit the parent's sys.path, so what the parent imports, a worker can import.
"""

from __future__ import annotations

import multiprocessing
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

_WORKER_START_TIMEOUT_S = 120.0
_MAX_CONSECUTIVE_START_FAILURES = 3
_READY = "ready"
_STOP = None


@dataclass(frozen=True)
class JobOutcome:
    """status "ok" (value: the handler's result), "error" (message: what it raised) or "timeout"."""

    status: str
    value: Any = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _worker_main(conn: Connection, handler: Callable[[Any], Any], warm_up: Callable[[], None] | None) -> None:
    """Worker loop: warm up, say ready, then receive (job_id, payload) and reply (job_id, status, value, message);
    exit on None or when the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the parent decides
    if warm_up is not None:
        warm_up()
    conn.send(_READY)
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is _STOP:
            return
        job_id, payload = message
        try:
            reply = (job_id, "ok", handler(payload), "")
        except Exception as error:  # contract: a worker never dies on input; the failure is reported as "error"
            reply = (job_id, "error", None, _describe(error))
        try:
            conn.send(reply)
        except Exception as error:  # a result that does not pickle
            conn.send((job_id, "error", None, f"the result could not be sent back: {_describe(error)}"))


def _start_method() -> str:
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


class _Worker:
    """One worker process and the parent's view of it."""

    def __init__(self, context: multiprocessing.context.BaseContext, handler: Callable[[Any], Any],
                 warm_up: Callable[[], None] | None, name: str) -> None:
        self.conn, child_conn = context.Pipe(duplex=True)
        self.process = context.Process(target=_worker_main, args=(child_conn, handler, warm_up), daemon=True, name=name)
        self.process.start()
        child_conn.close()
        self.start_deadline = time.monotonic() + _WORKER_START_TIMEOUT_S
        self.ready = False
        self.job_id: int | None = None
        self.job_deadline = 0.0

    @property
    def idle(self) -> bool:
        return self.ready and self.job_id is None

    def assign(self, job_id: int, payload: Any, timeout_s: float) -> None:
        self.conn.send((job_id, payload))
        self.job_id = job_id
        self.job_deadline = time.monotonic() + timeout_s

    def kill(self) -> None:
        self.process.kill()
        self.process.join(timeout=5.0)
        self.conn.close()

    def stop(self) -> None:
        """Ask an idle worker to exit; kill it if it is busy or does not exit promptly."""
        if self.idle:
            try:
                self.conn.send(_STOP)
            except OSError:
                pass  # already gone: nothing to stop
            self.process.join(timeout=2.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5.0)
        self.conn.close()


class TimedJobPool:
    """`handler(payload)` in worker processes, one job per worker at a time, each within `timeout_s`.

    `handler` and `warm_up` must be picklable (module-level functions, or functools.partial of them). A job whose
    handler raises gets JobOutcome("error", message=...); one that runs past its deadline, or whose worker dies, gets
    "timeout" or "error" and its worker is replaced. Not thread-safe: run jobs from one thread at a time.
    `workers_replaced` counts over the pool's lifetime (for logging).
    """

    def __init__(self, *, num_workers: int, timeout_s: float, handler: Callable[[Any], Any],
                 warm_up: Callable[[], None] | None = None, preload: Sequence[str] = (), name: str = "pool",
                 start_hint: str = "") -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.workers_replaced = 0
        self._handler, self._warm_up, self._name, self._start_hint = handler, warm_up, name, start_hint
        self._context = multiprocessing.get_context(_start_method())
        if preload and self._context.get_start_method() == "forkserver":
            # Only takes effect if this process has not started its fork server yet; harmless otherwise.
            self._context.set_forkserver_preload(list(preload))
        self._workers: list[_Worker] = []
        self._closed = False
        self._consecutive_start_failures = 0
        self._fill_workers()  # start now so the workers warm up while the caller generates rollouts

    def __enter__(self) -> TimedJobPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop all workers. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            worker.stop()
        self._workers.clear()

    def wait_until_ready(self) -> None:
        """Block until every worker has started and warmed up (to fail fast at set-up, or before timing)."""
        self._check_open()
        no_jobs: list[JobOutcome | None] = []
        self._fill_workers()
        while not all(worker.ready for worker in self._workers):
            self._wait_for_events()
            self._collect_replies(no_jobs)
            self._enforce_deadlines(no_jobs)
            self._fill_workers()

    def run_jobs(self, payloads: Sequence[Any]) -> list[JobOutcome]:
        """One outcome per payload, in order, each job within `timeout_s`."""
        self._check_open()
        outcomes: list[JobOutcome | None] = [None] * len(payloads)
        queue = deque(range(len(payloads)))
        try:
            while queue or any(worker.job_id is not None for worker in self._workers):
                self._fill_workers()
                for worker in self._workers:
                    if queue and worker.idle:
                        job_id = queue.popleft()
                        worker.assign(job_id, payloads[job_id], timeout_s=self.timeout_s)
                self._wait_for_events()
                self._collect_replies(outcomes)
                self._enforce_deadlines(outcomes)
        except BaseException:
            # Interrupted (e.g. KeyboardInterrupt): a late reply must not land in the next batch, so drop the
            # workers that still hold a job of this one.
            for worker in [worker for worker in self._workers if worker.job_id is not None]:
                self._retire(worker, outcomes, JobOutcome("error", message="interrupted"))
            raise
        assert all(outcome is not None for outcome in outcomes)
        return outcomes  # type: ignore[return-value]

    # -- scheduling ------------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")

    def _wait_for_events(self) -> None:
        deadlines = [w.job_deadline if w.job_id is not None else w.start_deadline for w in self._workers if not w.idle]
        assert deadlines, "waiting with no worker busy or starting would block forever"
        wait([worker.conn for worker in self._workers], timeout=max(0.0, min(deadlines) - time.monotonic()))

    def _collect_replies(self, outcomes: list[JobOutcome | None]) -> None:
        for worker in list(self._workers):
            try:
                if not worker.conn.poll():
                    continue
                message = worker.conn.recv()
            except (EOFError, OSError):
                # the worker died (crash, OOM kill) mid-job or at start-up
                self._retire(worker, outcomes, JobOutcome("error", message="the worker process died"))
                continue
            if message == _READY:
                worker.ready = True
                self._consecutive_start_failures = 0
            else:
                job_id, status, value, text = message
                assert job_id == worker.job_id, (job_id, worker.job_id)
                outcomes[job_id] = JobOutcome(status, value, text)
                worker.job_id = None

    def _enforce_deadlines(self, outcomes: list[JobOutcome | None]) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.job_id is not None and now >= worker.job_deadline:
                self._retire(worker, outcomes, JobOutcome("timeout", message=f"ran past {self.timeout_s:g} s"))
            elif not worker.ready and now >= worker.start_deadline:
                self._retire(worker, outcomes, JobOutcome("error", message="the worker did not start"))

    def _retire(self, worker: _Worker, outcomes: list[JobOutcome | None], outcome_for_job: JobOutcome) -> None:
        """Kill `worker`; its current job (if any) gets `outcome_for_job`. The next _fill_workers replaces it."""
        if worker.job_id is not None:
            outcomes[worker.job_id] = outcome_for_job
        elif not worker.ready:
            self._consecutive_start_failures += 1
        worker.kill()
        self._workers.remove(worker)
        self.workers_replaced += 1

    def _fill_workers(self) -> None:
        if self._consecutive_start_failures >= _MAX_CONSECUTIVE_START_FAILURES:
            self.close()
            raise RuntimeError(
                f"{self._name} workers failed to start {self._consecutive_start_failures} times in a row "
                f"(start method {self._context.get_start_method()!r}){'; ' + self._start_hint if self._start_hint else ''}"
            )
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._context, self._handler, self._warm_up, self._name))
