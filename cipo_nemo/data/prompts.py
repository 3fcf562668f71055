"""Turn task items into the exact prompt strings the policy sees, through the tokenizer's own chat template.

`problem_text` is the user-visible problem (prompt + the family's instruction); correction prompts quote it as
{problem}. `render_prompt` wraps it (or a chat item's messages) in the chat template with the generation prompt.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cipo_nemo.config import MasterConfig
from cipo_nemo.config.schema import InstructionConfig
from cipo_nemo.data.sources import DataError, TaskItem, describe, load_items

logger = logging.getLogger(__name__)

EMPTY: Mapping[str, Any] = MappingProxyType({})  # no extra chat-template variables


def family_instruction(family: str, instructions: InstructionConfig) -> str:
    """The instruction appended to every problem of `family`."""
    by_family = {"math": instructions.math, "code": instructions.code}
    return by_family[family]


def with_instruction(text: str, instruction: str) -> str:
    """`text`, a blank line and `instruction`; unchanged when the text already ends with the instruction."""
    if not instruction.strip() or text.rstrip().endswith(instruction.strip()):
        return text
    return f"{text.rstrip()}\n\n{instruction}"


def problem_text(item: TaskItem, instructions: InstructionConfig) -> str:
    """The problem as the user sees it: the prompt (or the last user message) followed by the instruction."""
    instruction = family_instruction(item.family, instructions)
    if item.prompt is not None:
        return with_instruction(item.prompt, instruction)
    return with_instruction(_last_user_message(item)["content"], instruction)


def render_chat(user_text: str, *, tokenizer: Any, system_prompt: str | None,
                template_kwargs: Mapping[str, Any] = EMPTY) -> str:
    """One user turn (after an optional system message) through the chat template, ready for generation;
    `template_kwargs` are extra template variables (`data.chat_template_kwargs`, e.g. enable_thinking)."""
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": user_text})
    return _apply_chat_template(messages, tokenizer=tokenizer, template_kwargs=template_kwargs)


def render_prompt(item: TaskItem, *, tokenizer: Any, instructions: InstructionConfig, system_prompt: str | None,
                  template_kwargs: Mapping[str, Any] = EMPTY) -> str:
    """The full prompt string of `item`: for a chat item its own messages, with the instruction on the last user
    turn and `system_prompt` prepended when the messages carry no system message of their own."""
    if item.prompt is not None:
        return render_chat(problem_text(item, instructions), tokenizer=tokenizer, system_prompt=system_prompt,
                           template_kwargs=template_kwargs)
    messages = [dict(message) for message in item.messages]
    last_user = max(index for index, message in enumerate(messages) if message["role"] == "user")
    messages[last_user]["content"] = problem_text(item, instructions)
    if system_prompt is not None and not any(message["role"] == "system" for message in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return _apply_chat_template(messages, tokenizer=tokenizer, template_kwargs=template_kwargs)


def encode_prompts(rendered: Sequence[str], *, tokenizer: Any) -> list[list[int]]:
    """Token ids of prompts that already went through the chat template (its special tokens are in the text)."""
    if not rendered:
        return []
    return [list(ids) for ids in tokenizer(list(rendered), add_special_tokens=False)["input_ids"]]


def count_prompt_tokens(rendered: Sequence[str], *, tokenizer: Any) -> list[int]:
    """Token counts of already rendered prompts."""
    return [len(ids) for ids in encode_prompts(rendered, tokenizer=tokenizer)]


def prompt_token_budget(*, max_total_sequence_length: int, max_new_tokens: int) -> int:
    """Tokens a prompt may have so that the full response budget still fits the context (trainer and eval)."""
    budget = max_total_sequence_length - max_new_tokens
    if budget < 1:
        raise DataError(f"generation.max_new_tokens ({max_new_tokens}) leaves no room for a prompt in the context of "
                        f"{max_total_sequence_length} tokens (policy.max_total_sequence_length)")
    return budget


def indices_within_budget(prompt_ids: Sequence[Sequence[int]], budget: int) -> list[int]:
    """Positions of the prompts with at most `budget` tokens (longer ones are dropped and counted by the caller)."""
    return [index for index, ids in enumerate(prompt_ids) if len(ids) <= budget]


def drop_long_prompts(
    items: Sequence[TaskItem],
    *,
    tokenizer: Any,
    instructions: InstructionConfig,
    system_prompt: str | None,
    max_prompt_tokens: int,
    template_kwargs: Mapping[str, Any] = EMPTY,
) -> tuple[list[TaskItem], int]:
    """Keep the items whose rendered prompt has at most `max_prompt_tokens` tokens; return them and the number
    dropped. Dropping every item is a DataError: a run with no prompt left cannot train."""
    rendered = [
        render_prompt(item, tokenizer=tokenizer, instructions=instructions, system_prompt=system_prompt,
                      template_kwargs=template_kwargs)
        for item in items
    ]
    lengths = count_prompt_tokens(rendered, tokenizer=tokenizer)
    kept = [item for item, length in zip(items, lengths, strict=True) if length <= max_prompt_tokens]
    if items and not kept:  # the error says it all: no warning line before it
        raise DataError(
            f"every one of the {len(items)} prompts is longer than data.max_prompt_tokens={max_prompt_tokens} "
            f"tokens (shortest: {min(lengths)} tokens)"
        )
    dropped = len(items) - len(kept)
    if dropped:
        logger.warning(
            "dropped %d of %d prompts longer than data.max_prompt_tokens=%d tokens (longest: %d tokens)",
            dropped, len(items), max_prompt_tokens, max(lengths),
        )
    return kept, dropped


def _last_user_message(item: TaskItem) -> dict[str, str]:
    user_messages = [message for message in item.messages if message["role"] == "user"]
    assert user_messages, "sources guarantee that chat items end with a user message"
    return user_messages[-1]


def _apply_chat_template(messages: list[dict[str, str]], *, tokenizer: Any, template_kwargs: Mapping[str, Any]) -> str:
    if tokenizer.chat_template is None:
        raise DataError(
            f"tokenizer {tokenizer.name_or_path!r} has no chat template; use an instruct/chat tokenizer "
            "(policy.tokenizer), one whose tokenizer_config.json sets chat_template, or data.chat_template"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **template_kwargs)


def use_chat_template_file(tokenizer: Any, path: str | None) -> Any:
    """`data.chat_template`: a Jinja template file for tokenizers that ship none (base models); returns the
    tokenizer. None leaves the tokenizer's own template."""
    if path is None:
        return tokenizer
    tokenizer.chat_template = chat_template_file(path).read_text()
    return tokenizer


def chat_template_file(path: str) -> Path:
    """The `data.chat_template` file, which must exist (the preflight checks it before any tokenizer is here)."""
    template = Path(path)
    if not template.is_file():
        raise DataError(f"data.chat_template: no such file {path} (resolved to {template.resolve()})")
    return template


def load_prompts(cfg: MasterConfig, tokenizer: Any, *, split: str, items: list[TaskItem] | None) -> list[TaskItem]:
    """The split's items (loaded here unless the preflight already did) without prompts over data.max_prompt_tokens."""
    if items is None:
        items, report = load_items(cfg.data.train if split == "train" else cfg.data.validation)
        logger.info("data.%s: %s", split, describe(report))
    kept, _ = drop_long_prompts(items, tokenizer=tokenizer, instructions=cfg.data.instructions,
                                template_kwargs=cfg.data.chat_template_kwargs,
                                system_prompt=cfg.data.system_prompt, max_prompt_tokens=cfg.data.max_prompt_tokens)
    return kept
