"""Math answer verifier: extract -> fast path -> math-verify in a process pool with timeouts.

Both CIPO streams (base GRPO rollouts and correction rollouts) are scored by this verifier, so it sits on the
critical path of every step and must be fast, must never raise on model output, and must never hang.

Pipeline for one (response, gold) pair:

1. **Extract** the final answer from the response: the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces
   matched by counting, so ``\\boxed{\\frac{1}{2}}`` works), else the last GSM8K-style ``#### x``, else the last
   "the (final) answer is x". Nothing found -> reason ``no_answer`` (a bare "42" with no marker is *not* accepted:
   the prompt asks for a marked answer). The gold goes through the same extractor and falls back to the whole
   string, so "42", "\\boxed{3}" and "#### 7" all work as golds.
2. **Fast path**, in the calling process, no sympy: if both answers are plain numbers ("1,234", "+3", "0.50",
   "3/4", "50%") they are compared exactly (fractions.Fraction) or, when a decimal is involved, with a relative
   tolerance of 1e-9. Near-misses that math-verify's 6-decimal rounding could still call equal, and a percent
   on one side only, are left to math-verify so the fast path never contradicts it. Answers whose normalized
   strings match (spaces, ``$``, ``\\text{}``, ``\\left``/``\\right``, trailing period, case outside LaTeX
   commands) are correct. Most RL answers are integers, so most pairs stop here: that is the speed-up.
3. **math-verify** (``parse`` + ``verify``) for everything else, each answer wrapped as ``$answer$`` so it is
   parsed as LaTeX. math-verify's own timeouts use ``signal.alarm`` (main thread only), so they are disabled
   (``parsing_timeout=None`` / ``timeout_seconds=None``) and :class:`MathVerifierPool` enforces a per-item
   wall-clock timeout instead by killing the worker process that overran it.

Entry points: :func:`verify_math` / :func:`score_one` (in-process, no timeout), :class:`MathVerifierPool` and
:func:`score_math_batch` (batched, timeouts, only the math-verify calls leave the calling process).
"""

from __future__ import annotations

import logging
import multiprocessing
import re
import signal
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from multiprocessing.connection import Connection, wait
from typing import Any

from math_verify import parse, verify

REASONS = ("correct", "wrong", "no_answer", "timeout", "error")

# Answers longer than this are never sent to math-verify: no real final answer is this long, and sympy/antlr on a
# runaway string can take minutes. They can still match by normalized string.
MAX_ANSWER_CHARS = 2000
# The fast path only looks at short strings; this also keeps int() far below Python's 4300-digit limit.
_MAX_PLAIN_NUMBER_CHARS = 100
_DECIMAL_REL_TOL = Fraction(1, 10**9)
_WORKER_START_TIMEOUT_S = 120.0
_MAX_CONSECUTIVE_START_FAILURES = 3


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once per process that its timeouts are off; here that is deliberate (see module doc)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _logger_name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_logger_name).addFilter(_DropTimeoutDisabledWarning())


@dataclass(frozen=True)
class MathVerdict:
    """Outcome for one response: ``reward`` is 1.0 or 0.0, ``reason`` one of :data:`REASONS`.

    ``extracted`` is the answer taken from the response (None when none was found or the input was not a str).
    """

    reward: float
    reason: str
    extracted: str | None = None


def _verdict(reason: str, extracted: str | None = None) -> MathVerdict:
    assert reason in REASONS, reason
    return MathVerdict(reward=1.0 if reason == "correct" else 0.0, reason=reason, extracted=extracted)


# ----------------------------------------------------------------------------------------------------------------
# 1. Extraction
# ----------------------------------------------------------------------------------------------------------------

_BOXED_OPEN_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
# An escaped pair ("\{", "\}", "\\") is consumed whole so that it never counts as a brace.
_BRACE_TOKEN_RE = re.compile(r"\\.|[{}]", re.DOTALL)
_ANSWER_IS_RE = re.compile(r"\bthe\s+(?:final\s+)?answer\s+is\b\s*:?", re.IGNORECASE)
_UNESCAPED_DOLLAR_RE = re.compile(r"(?<!\\)\$")


def _matching_close_braces(text: str, open_positions: Sequence[int]) -> dict[int, int]:
    """Map each position in ``open_positions`` (a "{") to its matching "}", for those that are closed.

    One left-to-right pass with a stack, so a response full of unclosed ``\\boxed{`` stays linear in its length.
    """
    wanted = set(open_positions)
    matches: dict[int, int] = {}
    stack: list[int] = []
    for token in _BRACE_TOKEN_RE.finditer(text, min(open_positions)):
        char = token.group()
        if char == "{":
            stack.append(token.start())
        elif char == "}" and stack:
            opened_at = stack.pop()
            if opened_at in wanted:
                matches[opened_at] = token.start()
    return matches


def _extract_last_boxed(text: str) -> str | None:
    """Content of the last closed ``\\boxed{...}`` / ``\\fbox{...}``; unclosed ones are skipped."""
    open_braces = [match.end() - 1 for match in _BOXED_OPEN_RE.finditer(text)]
    if not open_braces:
        return None
    closes = _matching_close_braces(text, open_braces)
    for opened_at in reversed(open_braces):
        if opened_at in closes:
            return text[opened_at + 1 : closes[opened_at]].strip()
    return None


def _strip_answer_decoration(answer: str) -> str:
    """Drop markdown bold, surrounding ``$`` and a trailing sentence period from a free-text answer."""
    previous = None
    while answer != previous:  # decorations nest in either order: "**7**.", "$\\frac12$."
        previous = answer
        answer = answer.strip().rstrip(".").strip("*$")
    return answer


def _rest_of_line(text: str, start: int) -> str:
    end = text.find("\n", start)
    return text[start:] if end == -1 else text[start:end]


def _extract_gsm8k(text: str) -> str | None:
    marker = text.rfind("####")
    if marker == -1:
        return None
    return _strip_answer_decoration(_rest_of_line(text, marker + 4)) or None


def _extract_answer_is(text: str) -> str | None:
    last_match = None
    for last_match in _ANSWER_IS_RE.finditer(text):
        pass
    if last_match is None:
        return None
    return _strip_answer_decoration(_rest_of_line(text, last_match.end())) or None


def extract_answer(response: str) -> str | None:
    """The final answer of ``response``: last boxed, else last ``####``, else last "the answer is"; else None."""
    for extractor in (_extract_last_boxed, _extract_gsm8k, _extract_answer_is):
        answer = extractor(response)
        if answer:
            return answer
    return None


def gold_answer(gold: str) -> str:
    """The reference answer: extracted like a response when marked, else the whole string without ``$``."""
    return extract_answer(gold) or gold.strip().strip("$").strip()


# ----------------------------------------------------------------------------------------------------------------
# 2. Fast path
# ----------------------------------------------------------------------------------------------------------------

_PLAIN_DECIMAL_RE = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[+-]?\.\d+")
_PLAIN_FRACTION_RE = re.compile(r"([+-]?\d+)/(\d+)")
_LATEX_THIN_SPACES = ("\\,", "\\!", "\\;", "\\ ")
_TEXT_COMMAND_RE = re.compile(r"\\text\s*\{([^{}]*)\}")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_LATEX_COMMAND_SPLIT_RE = re.compile(r"(\\[A-Za-z]+)")


@dataclass(frozen=True)
class _PlainNumber:
    value: Fraction
    is_decimal: bool
    is_percent: bool


def _parse_plain_number(answer: str) -> _PlainNumber | None:
    """Parse ints, decimals, "a/b", "1,234", "+3", "5.0", "50%" (optional ``$``); None for anything else."""
    if len(answer) > _MAX_PLAIN_NUMBER_CHARS:
        return None
    text = answer.strip().replace("$", "").replace("{,}", ",").replace("\u2212", "-")
    for thin_space in _LATEX_THIN_SPACES:
        text = text.replace(thin_space, "")
    text = text.strip()
    is_percent = text.endswith("%")
    if is_percent:
        text = text.removesuffix("\\%").removesuffix("%").strip()
    if _PLAIN_DECIMAL_RE.fullmatch(text):
        digits = text.replace(",", "")
        return _PlainNumber(Fraction(digits.rstrip(".") or "0"), "." in digits, is_percent)
    fraction = _PLAIN_FRACTION_RE.fullmatch(text)
    if fraction and int(fraction.group(2)) != 0:
        return _PlainNumber(Fraction(int(fraction.group(1)), int(fraction.group(2))), False, is_percent)
    return None


def _compare_plain_numbers(pred: _PlainNumber, gold: _PlainNumber) -> str | None:
    """Return "correct"/"wrong" when the numbers settle it, None when math-verify should decide."""
    if pred.value == gold.value:
        return "correct"
    if pred.is_percent != gold.is_percent:
        return None  # "50%" vs "0.5": a matter of convention, math-verify's to judge
    if not (pred.is_decimal or gold.is_decimal):
        return "wrong"
    difference = abs(pred.value - gold.value)
    scale = max(abs(pred.value), abs(gold.value))
    if difference <= _DECIMAL_REL_TOL * scale:
        return "correct"
    # math-verify rounds floats to 6 decimals (1/3 == 0.333333), so a near-miss is not ours to call wrong.
    if difference <= Fraction(2, 10**6) + Fraction(1, 10**6) * scale:
        return None
    return "wrong"


def _normalize_for_string_match(answer: str) -> str:
    """Spaces, ``$``, ``\\text{}``, ``\\left``/``\\right`` and a trailing period removed; case folded outside
    LaTeX commands (so "\\Pi" and "\\pi" stay different)."""
    text = _TEXT_COMMAND_RE.sub(r"\1", answer)
    text = _LEFT_RIGHT_RE.sub("", text)
    text = "".join(text.replace("$", "").split()).rstrip(".")
    return "".join(
        part if part.startswith("\\") else part.casefold() for part in _LATEX_COMMAND_SPLIT_RE.split(text)
    )


def fast_path_reason(pred_answer: str, gold_answer_text: str) -> str | None:
    """Return "correct"/"wrong" when decidable without sympy, None when math-verify is needed."""
    pred_number = _parse_plain_number(pred_answer)
    gold_number = _parse_plain_number(gold_answer_text)
    if pred_number is not None and gold_number is not None:
        decided = _compare_plain_numbers(pred_number, gold_number)
        if decided is not None:
            return decided
    normalized_pred = _normalize_for_string_match(pred_answer)
    if normalized_pred and normalized_pred == _normalize_for_string_match(gold_answer_text):
        return "correct"
    if len(pred_answer) > MAX_ANSWER_CHARS or len(gold_answer_text) > MAX_ANSWER_CHARS:
        return "wrong"
    return None


# ----------------------------------------------------------------------------------------------------------------
# 3. math-verify
# ----------------------------------------------------------------------------------------------------------------


def _as_latex(answer: str) -> str:
    # "$...$" rather than "\boxed{...}": math-verify parses "$50\%$" but not "\boxed{50\%}".
    return "$" + _UNESCAPED_DOLLAR_RE.sub("", answer) + "$"


def math_verify_equivalent(pred_answer: str, gold_answer_text: str) -> bool:
    """math-verify's judgement of two extracted answers, with its signal-based timeouts disabled."""
    gold_parsed = parse(_as_latex(gold_answer_text), parsing_timeout=None)
    pred_parsed = parse(_as_latex(pred_answer), parsing_timeout=None)
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


@dataclass(frozen=True)
class _Prepared:
    """Where the calling process got to with one item: a final verdict, or answers math-verify must judge."""

    verdict: MathVerdict | None
    pred_answer: str | None = None
    gold_answer: str | None = None

    @property
    def job_key(self) -> tuple[str, str]:
        assert self.verdict is None and self.pred_answer is not None and self.gold_answer is not None
        return self.pred_answer, self.gold_answer


def _prepare(response: Any, gold: Any) -> _Prepared:
    """Extraction and fast path; never raises (a failure becomes reason "error")."""
    if not isinstance(response, str) or not isinstance(gold, str):
        return _Prepared(_verdict("error"))
    try:
        pred = extract_answer(response)
        if pred is None:
            return _Prepared(_verdict("no_answer"))
        reference = gold_answer(gold)
        if not reference:
            return _Prepared(_verdict("error", pred))
        decided = fast_path_reason(pred, reference)
        if decided is not None:
            return _Prepared(_verdict(decided, pred))
        return _Prepared(None, pred, reference)
    except Exception:  # contract: never raise; the failure is reported as reason "error"
        return _Prepared(_verdict("error"))


def score_one(response: str, gold: str) -> MathVerdict:
    """Score one response in this process, without a timeout. Never raises."""
    prepared = _prepare(response, gold)
    if prepared.verdict is not None:
        return prepared.verdict
    pred_answer, reference = prepared.job_key
    try:
        same = math_verify_equivalent(pred_answer, reference)
    except Exception:  # contract: never raise; the failure is reported as reason "error"
        return _verdict("error", pred_answer)
    return _verdict("correct" if same else "wrong", pred_answer)


def verify_math(response: str, gold: str) -> float:
    """1.0 if ``response``'s final answer matches ``gold``, else 0.0. In-process, no timeout, never raises."""
    return score_one(response, gold).reward


def reason_counts(verdicts: Sequence[MathVerdict]) -> dict[str, int]:
    """How many verdicts carry each reason (all of :data:`REASONS` present, zeros included)."""
    counts = Counter(verdict.reason for verdict in verdicts)
    return {reason: counts.get(reason, 0) for reason in REASONS}


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
        prepared = [_prepare(response, gold) for response, gold in zip(responses, golds)]
        # Identical (answer, gold) pairs are common among G samples of one prompt: ask math-verify once.
        job_ids: dict[tuple[str, str], int] = {}
        for item in prepared:
            if item.verdict is None:
                job_ids.setdefault(item.job_key, len(job_ids))
        job_reasons = self._run_jobs(list(job_ids)) if job_ids else []
        self.math_verify_calls += len(job_ids)
        verdicts = [
            item.verdict if item.verdict is not None else _verdict(job_reasons[job_ids[item.job_key]], item.pred_answer)
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
