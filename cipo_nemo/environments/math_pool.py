"""The math verifier's process pool: math-verify calls with a per-item wall-clock timeout.

Extraction and the fast path (cipo_nemo/environments/math.py) run in the calling process; only the pairs that need
math-verify are sent to the pool's workers. :class:`MathVerifierPool` keeps workers alive across batches (a
training loop holds one); :func:`score_math_batch` uses a short-lived one.
"""

from __future__ import annotations

import multiprocessing
import signal
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait

from cipo_nemo.environments.math import MathVerdict, math_verify_equivalent, prepare_pair, verdict_of

_WORKER_START_TIMEOUT_S = 120.0
_MAX_CONSECUTIVE_START_FAILURES = 3

# ----------------------------------------------------------------------------------------------------------------
# Process pool with per-item timeouts
# ----------------------------------------------------------------------------------------------------------------
#
# Design: a stuck sympy call cannot be interrupted from outside its process (no signal.alarm off the main thread,
# and a concurrent.futures future that is already running cannot be cancelled). So the pool owns its worker
# processes directly, one duplex Pipe each, and gives each worker one item at a time with a deadline. When a
# deadline passes the parent SIGKILLs that worker, records "timeout" for its item, and starts a replacement; the
# other workers keep going. Deadlines start only once a worker has reported "ready" (math-verify imported and
# warmed up), so start-up time never counts against an item.
#
# Start method: "forkserver" with math_verify preloaded where available, else "spawn". Never "fork": the trainer
# process holds CUDA contexts and threads (Ray, NCCL, tokenizers), and forking those is undefined behaviour. The
# fork server is itself a fresh interpreter, so its forks are clean, and since it has already imported sympy a
# replacement worker only pays its warm-up (about 0.35 s here, against about 0.7 s for a spawned one).

_READY = "ready"
_STOP = None
EquivalenceFn = Callable[[str, str], bool]


# One of each kind of work, so that the LaTeX grammar, math-verify's regexes and sympy's lazily imported
# simplification modules are loaded before the worker reports ready (and before any item's deadline starts).
_WARM_UP_PAIRS = (
    ("\\frac{2}{4}", "0.5"),
    ("x^2+2x+1", "(x+1)^2"),
    ("\\sqrt{8}", "2\\sqrt{2}"),
    ("(1,2]", "(1,2]"),
)


def _worker_main(conn: Connection, equivalence_fn: EquivalenceFn) -> None:
    """Worker loop: receive (job_id, pred, gold), reply (job_id, reason); exit on None or when the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the parent decides
    for pred_answer, gold_answer_text in _WARM_UP_PAIRS:
        math_verify_equivalent(pred_answer, gold_answer_text)
    conn.send(_READY)
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is _STOP:
            return
        job_id, pred_answer, gold_answer_text = message
        try:
            reason = "correct" if equivalence_fn(pred_answer, gold_answer_text) else "wrong"
        except Exception:  # contract: a worker never dies on input; the failure is reported as reason "error"
            reason = "error"
        conn.send((job_id, reason))


def _start_method() -> str:
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


class _Worker:
    """One worker process and the parent's view of it."""

    def __init__(self, context: multiprocessing.context.BaseContext, equivalence_fn: EquivalenceFn) -> None:
        self.conn, child_conn = context.Pipe(duplex=True)
        self.process = context.Process(
            target=_worker_main, args=(child_conn, equivalence_fn), daemon=True, name="math-verifier"
        )
        self.process.start()
        child_conn.close()
        self.start_deadline = time.monotonic() + _WORKER_START_TIMEOUT_S
        self.ready = False
        self.job_id: int | None = None
        self.job_deadline = 0.0

    @property
    def idle(self) -> bool:
        return self.ready and self.job_id is None

    def assign(self, job_id: int, pred_answer: str, gold_answer_text: str, timeout_s: float) -> None:
        self.conn.send((job_id, pred_answer, gold_answer_text))
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


class MathVerifierPool:
    """Batched scoring: extraction and fast path here, math-verify in worker processes with per-item timeouts.

    An item whose math-verify call runs past ``timeout_s`` gets reason "timeout" (reward 0.0); its worker is killed
    and replaced, and the rest of the batch is unaffected. Never raises on any input values (non-str items get
    reason "error"); raises ValueError on mismatched lengths and RuntimeError if workers cannot be started at all.
    Not thread-safe: call :meth:`score` from one thread at a time. ``reason_totals``, ``math_verify_calls``
    (distinct pairs shipped to workers) and ``workers_replaced`` count over the pool's lifetime (for logging).

    ``_equivalence_fn`` replaces :func:`math_verify_equivalent` in the workers (tests only; it must be a picklable
    module-level function).
    """

    def __init__(
        self,
        *,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        _equivalence_fn: EquivalenceFn = math_verify_equivalent,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.reason_totals: Counter[str] = Counter()
        self.math_verify_calls = 0
        self.workers_replaced = 0
        self._equivalence_fn = _equivalence_fn
        self._context = multiprocessing.get_context(_start_method())
        if self._context.get_start_method() == "forkserver":
            # Only takes effect if this process has not started its fork server yet; harmless otherwise.
            self._context.set_forkserver_preload(["math_verify"])
        self._workers: list[_Worker] = []
        self._closed = False
        self._consecutive_start_failures = 0
        self._fill_workers()  # start now so the workers warm up while the caller generates rollouts

    def __enter__(self) -> MathVerifierPool:
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
        """Block until every worker has started and warmed up.

        :meth:`score` does not need this (it uses workers as they become ready); call it at set-up to fail fast
        when workers cannot start, or before timing throughput.
        """
        self._check_open()
        no_jobs: list[str | None] = []
        self._fill_workers()
        while not all(worker.ready for worker in self._workers):
            self._wait_for_events()
            self._collect_replies(no_jobs)
            self._enforce_deadlines(no_jobs)
            self._fill_workers()

    def score(self, responses: Sequence[str], golds: Sequence[str]) -> list[MathVerdict]:
        """One verdict per (response, gold), in order."""
        self._check_open()
        if len(responses) != len(golds):
            raise ValueError(f"got {len(responses)} responses but {len(golds)} golds")
        prepared = [prepare_pair(response, gold) for response, gold in zip(responses, golds)]
        # Identical (answer, gold) pairs are common among G samples of one prompt: ask math-verify once.
        job_ids: dict[tuple[str, str], int] = {}
        for item in prepared:
            if item.verdict is None:
                job_ids.setdefault(item.job_key, len(job_ids))
        job_reasons = self._run_jobs(list(job_ids)) if job_ids else []
        self.math_verify_calls += len(job_ids)
        verdicts = [
            item.verdict if item.verdict is not None else verdict_of(job_reasons[job_ids[item.job_key]], item.pred_answer)
            for item in prepared
        ]
        self.reason_totals.update(verdict.reason for verdict in verdicts)
        return verdicts

    # -- scheduling ------------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("MathVerifierPool is closed")

    def _run_jobs(self, jobs: list[tuple[str, str]]) -> list[str]:
        """math-verify reasons for ``jobs`` ((pred, gold) pairs), with timeouts; returns one reason per job."""
        reasons: list[str | None] = [None] * len(jobs)
        queue = deque(range(len(jobs)))
        try:
            while queue or any(worker.job_id is not None for worker in self._workers):
                self._fill_workers()
                for worker in self._workers:
                    if queue and worker.idle:
                        job_id = queue.popleft()
                        worker.assign(job_id, *jobs[job_id], timeout_s=self.timeout_s)
                self._wait_for_events()
                self._collect_replies(reasons)
                self._enforce_deadlines(reasons)
        except BaseException:
            # Interrupted (e.g. KeyboardInterrupt): a late reply must not land in the next batch, so drop the
            # workers that still hold an item of this one.
            for worker in [worker for worker in self._workers if worker.job_id is not None]:
                self._retire(worker, reasons, "error")
            raise
        assert all(reason is not None for reason in reasons)
        return reasons  # type: ignore[return-value]

    def _wait_for_events(self) -> None:
        deadlines = [w.job_deadline if w.job_id is not None else w.start_deadline for w in self._workers if not w.idle]
        assert deadlines, "waiting with no worker busy or starting would block forever"
        wait([worker.conn for worker in self._workers], timeout=max(0.0, min(deadlines) - time.monotonic()))

    def _collect_replies(self, reasons: list[str | None]) -> None:
        for worker in list(self._workers):
            try:
                if not worker.conn.poll():
                    continue
                message = worker.conn.recv()
            except (EOFError, OSError):
                self._retire(worker, reasons, "error")  # the worker died (crash, OOM kill) mid-item or at start-up
                continue
            if message == _READY:
                worker.ready = True
                self._consecutive_start_failures = 0
            else:
                job_id, reason = message
                assert job_id == worker.job_id, (job_id, worker.job_id)
                reasons[job_id] = reason
                worker.job_id = None

    def _enforce_deadlines(self, reasons: list[str | None]) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.job_id is not None and now >= worker.job_deadline:
                self._retire(worker, reasons, "timeout")
            elif not worker.ready and now >= worker.start_deadline:
                self._retire(worker, reasons, "error")

    def _retire(self, worker: _Worker, reasons: list[str | None], reason_for_job: str) -> None:
        """Kill ``worker``; its current item (if any) gets ``reason_for_job``. The next _fill_workers replaces it."""
        if worker.job_id is not None:
            reasons[worker.job_id] = reason_for_job
        elif not worker.ready:
            self._consecutive_start_failures += 1
        worker.kill()
        self._workers.remove(worker)
        self.workers_replaced += 1

    def _fill_workers(self) -> None:
        if self._consecutive_start_failures >= _MAX_CONSECUTIVE_START_FAILURES:
            self.close()
            raise RuntimeError(
                f"math verifier workers failed to start {self._consecutive_start_failures} times in a row "
                f"(start method {self._context.get_start_method()!r}); is math-verify importable in a fresh process?"
            )
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._context, self._equivalence_fn))


def score_math_batch(
    responses: Sequence[str], golds: Sequence[str], *, num_workers: int = 2, timeout_s: float = 5.0
) -> tuple[list[float], list[str]]:
    """Rewards and reasons for a batch, using a short-lived :class:`MathVerifierPool`.

    A training loop should keep one pool alive instead: starting workers costs about a second.
    """
    with MathVerifierPool(num_workers=num_workers, timeout_s=timeout_s) as pool:
        verdicts = pool.score(responses, golds)
    return [verdict.reward for verdict in verdicts], [verdict.reason for verdict in verdicts]
