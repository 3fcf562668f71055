"""Prompt rendering through the tokenizer's own chat template."""

from __future__ import annotations

import logging

import pytest

from cipo_nemo.config.schema import InstructionConfig
from cipo_nemo.data.prompts import drop_long_prompts, problem_text, render_chat, render_prompt, use_chat_template_file
from cipo_nemo.data.sources import DataError, TaskItem
from cipo_nemo.models.tiny import build_tiny_tokenizer

INSTRUCTIONS = InstructionConfig(math="Put the answer in \\boxed{}.", code="Answer in one ```python block.")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def make_item(*, prompt: str | None = None, messages=None, family: str = "math", item_id: str = "x") -> TaskItem:
    return TaskItem(
        id=item_id, family=family, prompt=prompt, messages=messages, answer="1", origin="test", metadata={}
    )


def test_problem_text_appends_the_family_instruction_once():
    assert problem_text(make_item(prompt="What is 2 + 3?"), INSTRUCTIONS) == (
        "What is 2 + 3?\n\nPut the answer in \\boxed{}."
    )
    assert problem_text(make_item(prompt="Reverse a list.\n", family="code"), INSTRUCTIONS) == (
        "Reverse a list.\n\nAnswer in one ```python block."
    )
    already = "What is 2 + 3?\n\nPut the answer in \\boxed{}."
    assert problem_text(make_item(prompt=already), INSTRUCTIONS) == already


def test_problem_text_of_a_chat_item_uses_the_last_user_message():
    messages = (
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "What is 4 * 4?"},
    )
    assert problem_text(make_item(messages=messages), INSTRUCTIONS) == "What is 4 * 4?\n\nPut the answer in \\boxed{}."


def test_render_prompt_is_exact_chatml(tokenizer):
    rendered = render_prompt(
        make_item(prompt="What is 2 + 3?"), tokenizer=tokenizer, instructions=INSTRUCTIONS, system_prompt=None
    )
    assert rendered == (
        "<|im_start|>user\nWhat is 2 + 3?\n\nPut the answer in \\boxed{}.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_render_prompt_with_system_prompt(tokenizer):
    rendered = render_prompt(
        make_item(prompt="Sort a list.", family="code"),
        tokenizer=tokenizer,
        instructions=INSTRUCTIONS,
        system_prompt="You are careful.",
    )
    assert rendered == (
        "<|im_start|>system\nYou are careful.<|im_end|>\n"
        "<|im_start|>user\nSort a list.\n\nAnswer in one ```python block.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_render_prompt_of_chat_items(tokenizer):
    messages = (
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "What is 4 * 4?"},
    )
    item = make_item(messages=messages)
    rendered = render_prompt(item, tokenizer=tokenizer, instructions=INSTRUCTIONS, system_prompt="Sys.")
    assert rendered == (
        "<|im_start|>system\nSys.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\nWhat is 4 * 4?\n\nPut the answer in \\boxed{}.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert item.messages[-1]["content"] == "What is 4 * 4?"  # the item itself is left alone

    own_system = make_item(messages=({"role": "system", "content": "Own."}, {"role": "user", "content": "Q?"}))
    rendered = render_prompt(own_system, tokenizer=tokenizer, instructions=INSTRUCTIONS, system_prompt="Sys.")
    assert rendered == (
        "<|im_start|>system\nOwn.<|im_end|>\n"
        "<|im_start|>user\nQ?\n\nPut the answer in \\boxed{}.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_render_chat_without_a_chat_template_is_a_data_error():
    no_template = build_tiny_tokenizer(chat_template=None)
    no_template.name_or_path = "models/base-only"
    with pytest.raises(DataError, match="tokenizer 'models/base-only' has no chat template"):
        render_chat("Hi", tokenizer=no_template, system_prompt=None)


def test_a_chat_template_file_and_template_variables(tmp_path):
    """data.chat_template gives a base tokenizer a template; data.chat_template_kwargs reach the template."""
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}{% if terse %}!{% endif %}] {{ m.content }}\n"
                        "{% endfor %}[assistant]")
    no_template = build_tiny_tokenizer(chat_template=None)
    tokenizer = use_chat_template_file(no_template, str(template))
    assert render_chat("Hi", tokenizer=tokenizer, system_prompt=None) == "[user] Hi\n[assistant]"
    assert render_chat("Hi", tokenizer=tokenizer, system_prompt="S", template_kwargs={"terse": True}) \
        == "[system!] S\n[user!] Hi\n[assistant]"
    with pytest.raises(DataError, match="data.chat_template: no such file"):
        use_chat_template_file(build_tiny_tokenizer(chat_template=None), str(tmp_path / "missing.jinja"))
    assert use_chat_template_file(no_template, None) is no_template


def test_drop_long_prompts_counts_and_warns(tokenizer, caplog):
    short = make_item(prompt="1+1?", item_id="short")
    long = make_item(prompt="What is 12 + 7? " * 20, item_id="long")
    rendered_short = render_prompt(short, tokenizer=tokenizer, instructions=INSTRUCTIONS, system_prompt=None)
    short_length = len(tokenizer(rendered_short, add_special_tokens=False)["input_ids"])

    with caplog.at_level(logging.WARNING, logger="cipo_nemo.data.prompts"):
        kept, dropped = drop_long_prompts(
            [short, long], tokenizer=tokenizer, instructions=INSTRUCTIONS, system_prompt=None,
            max_prompt_tokens=short_length,
        )
    assert [item.id for item in kept] == ["short"]
    assert dropped == 1
    assert len(caplog.records) == 1
    assert f"dropped 1 of 2 prompts longer than data.max_prompt_tokens={short_length}" in caplog.records[0].getMessage()

    kept, dropped = drop_long_prompts(
        [short], tokenizer=tokenizer, instructions=INSTRUCTIONS, system_prompt=None, max_prompt_tokens=short_length
    )
    assert (kept, dropped) == ([short], 0)


def test_drop_long_prompts_that_drops_everything_is_a_data_error(tokenizer):
    with pytest.raises(DataError, match="every one of the 1 prompts is longer than data.max_prompt_tokens=3"):
        drop_long_prompts(
            [make_item(prompt="What is 1 + 1?")], tokenizer=tokenizer, instructions=INSTRUCTIONS,
            system_prompt=None, max_prompt_tokens=3,
        )
