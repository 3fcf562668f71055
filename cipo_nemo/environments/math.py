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

Entry points: :func:`verify_math` / :func:`score_one` (in-process, no timeout); the batched path with timeouts,
:class:`MathVerifierPool` and :func:`score_math_batch`, lives in cipo_nemo/environments/math_pool.py.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from math_verify import parse, verify

REASONS = ("correct", "wrong", "no_answer", "timeout", "error")

# Answers longer than this are never sent to math-verify: no real final answer is this long, and sympy/antlr on a
# runaway string can take minutes. They can still match by normalized string.
MAX_ANSWER_CHARS = 2000
# The fast path only looks at short strings; this also keeps int() far below Python's 4300-digit limit.
_MAX_PLAIN_NUMBER_CHARS = 100
_DECIMAL_REL_TOL = Fraction(1, 10**9)


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


def verdict_of(reason: str, extracted: str | None = None) -> MathVerdict:
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


def prepare_pair(response: Any, gold: Any) -> _Prepared:
    """Extraction and fast path; never raises (a failure becomes reason "error")."""
    if not isinstance(response, str) or not isinstance(gold, str):
        return _Prepared(verdict_of("error"))
    try:
        pred = extract_answer(response)
        if pred is None:
            return _Prepared(verdict_of("no_answer"))
        reference = gold_answer(gold)
        if not reference:
            return _Prepared(verdict_of("error", pred))
        decided = fast_path_reason(pred, reference)
        if decided is not None:
            return _Prepared(verdict_of(decided, pred))
        return _Prepared(None, pred, reference)
    except Exception:  # contract: never raise; the failure is reported as reason "error"
        return _Prepared(verdict_of("error"))


def score_one(response: str, gold: str) -> MathVerdict:
    """Score one response in this process, without a timeout. Never raises."""
    prepared = prepare_pair(response, gold)
    if prepared.verdict is not None:
        return prepared.verdict
    pred_answer, reference = prepared.job_key
    try:
        same = math_verify_equivalent(pred_answer, reference)
    except Exception:  # contract: never raise; the failure is reported as reason "error"
        return verdict_of("error", pred_answer)
    return verdict_of("correct" if same else "wrong", pred_answer)


def verify_math(response: str, gold: str) -> float:
    """1.0 if ``response``'s final answer matches ``gold``, else 0.0. In-process, no timeout, never raises."""
    return score_one(response, gold).reward


def reason_counts(verdicts: Sequence[MathVerdict]) -> dict[str, int]:
    """How many verdicts carry each reason (all of :data:`REASONS` present, zeros included)."""
    counts = Counter(verdict.reason for verdict in verdicts)
    return {reason: counts.get(reason, 0) for reason in REASONS}
