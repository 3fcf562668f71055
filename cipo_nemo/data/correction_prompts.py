"""The text of a correction prompt (docs/design.md step 3): the problem, the policy's previous attempt, and an
instruction to review it and fix it or keep it. The verifier's verdict is never shown to the policy.

`build_correction_prompt` makes the user message from `cipo.templates`; `render_correction_prompt` puts it
through the chat template exactly as the trainer and the evaluation harness both need it.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Protocol

from cipo_nemo.config.schema import CorrectionConfig, DataConfig
from cipo_nemo.data.prompts import problem_text, render_chat
from cipo_nemo.data.sources import TaskItem

TRUNCATION_MARKER = "..."

class _Tokenizer(Protocol):
    def __call__(self, text: str, **kwargs: Any) -> Any: ...


class _Templates(Protocol):
    math: str
    code: str


_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
_THINK_OPEN = "<think>"
_THINK_CLOSE = "</think>"
# a fenced block: ``` + optional info string + newline, up to the closing ``` (or the end: a cut-off response)
_CODE_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PLACEHOLDER = re.compile(r"\{(problem|attempt|language)\}")


def remove_thinking(text: str) -> str:
    """Remove the reasoning part of a response and strip surrounding whitespace.

    In this order: every complete ``<think>...</think>`` block; then, if a ``</think>`` is left (Qwen3-style
    responses whose opening tag sits in the prompt), everything up to and including the last one; then, if a
    ``<think>`` is left (a response cut off while thinking), everything from it to the end.
    """
    text = _THINK_BLOCK.sub("", text)
    if _THINK_CLOSE in text:
        text = text.rsplit(_THINK_CLOSE, 1)[1]
    if _THINK_OPEN in text:
        text = text.split(_THINK_OPEN, 1)[0]
    return text.strip()


def truncate_left(text: str, *, tokenizer: _Tokenizer, max_tokens: int) -> str:
    """Keep the end of `text` (where the final answer lives) within a budget of `max_tokens` tokens.

    Unchanged when `text` encodes to at most `max_tokens` tokens. Otherwise the result is ``"..."`` followed by
    the longest tail of `text` that starts at a token boundary, such that the *whole result, marker
    included*, encodes to at most `max_tokens` tokens (no special tokens). When the budget is too small to
    hold the marker and one token of text, the tail is returned without the marker. The tail is cut from the
    original string (never decoded), so a multi-byte character is kept whole or dropped whole.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    num_tokens = len(encoding["input_ids"])
    if num_tokens <= max_tokens:
        return text
    # tail_starts[k] = char position where the last k tokens begin (the end of the last dropped token)
    tail_starts = {keep: encoding["offset_mapping"][num_tokens - keep - 1][1] for keep in range(1, max_tokens + 1)}
    for prefix in (TRUNCATION_MARKER, ""):
        for keep in range(max_tokens, 0, -1):
            candidate = prefix + text[tail_starts[keep] :]
            if _count_tokens(candidate, tokenizer) <= max_tokens:
                return candidate
    return ""


def _count_tokens(text: str, tokenizer: _Tokenizer) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def extract_last_code_block(text: str) -> str:
    """The body of the last fenced code block (a final unclosed fence counts), else the whole text."""
    blocks = _CODE_FENCE.findall(text)
    if not blocks:
        return text
    return blocks[-1].rstrip("\n")


def build_correction_prompt(
    *,
    problem: str,
    attempt: str,
    family: Literal["math", "code"],
    templates: _Templates,
    tokenizer: _Tokenizer,
    attempt_max_tokens: int,
    strip_thinking: bool,
    language: str = "python",
) -> str:
    """The user message of a correction prompt: the family's template with the problem and the attempt.

    The attempt is prepared as: thinking removed (when `strip_thinking`), for code the last fenced code block
    (else the whole text), surrounding blank lines removed, then `truncate_left` to `attempt_max_tokens`.
    ``{problem}``, ``{attempt}`` and ``{language}`` are replaced literally in one pass, so other braces (LaTeX's
    ``\\boxed{}``) stay as written and placeholder-like text inside the problem or attempt is not substituted.
    Nothing about the verifier's verdict on the attempt is added.
    """
    if family not in ("math", "code"):
        raise ValueError(f"family must be 'math' or 'code', got {family!r}")
    template = getattr(templates, family)
    quoted = remove_thinking(attempt) if strip_thinking else attempt
    if family == "code":
        quoted = extract_last_code_block(quoted)
    quoted = truncate_left(quoted.strip("\n"), tokenizer=tokenizer, max_tokens=attempt_max_tokens)
    values = {"problem": problem, "attempt": quoted, "language": language}
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def render_correction_prompt(
    item: TaskItem, attempt: str, *, tokenizer: Any, data: DataConfig, correction: CorrectionConfig,
    template: str | None = None,
) -> str:
    """The chat-templated correction prompt for `attempt` at `item` (``data``: instructions and system prompt;
    ``correction``: ``cipo`` templates, attempt budget, thinking removal); `template` replaces the item family's
    ``cipo.templates`` entry (a correction benchmark row's own template)."""
    templates = correction.templates if template is None else \
        correction.templates.model_copy(update={item.family: template})
    text = build_correction_prompt(
        problem=problem_text(item, data.instructions), attempt=attempt, family=item.family,
        templates=templates, tokenizer=tokenizer, attempt_max_tokens=correction.attempt_max_tokens,
        strip_thinking=correction.strip_thinking)
    return render_chat(text, tokenizer=tokenizer, system_prompt=data.system_prompt,
                       template_kwargs=data.chat_template_kwargs)
