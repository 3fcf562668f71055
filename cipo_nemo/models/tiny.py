"""Tiny, fully offline tokenizers (and, later, models) for tests and small-scale experiments.

A byte-level BPE trained in well under a second on the task text, with ChatML special tokens and a ChatML chat
template, so that code paths that apply the tokenizer's own chat template run without any hub download.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>")
_DEFAULT_CORPUS = (
    "What is 12 + 7? Let me think step by step. 12 + 7 = 19. The answer is \\boxed{19}.",
    "def add(a, b):\n    return a + b\n",
)


def build_tiny_tokenizer(
    corpus: Iterable[str] = _DEFAULT_CORPUS, *, vocab_size: int = 512, chat_template: str | None = CHATML_TEMPLATE
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `corpus`. Any text encodes (bytes are the base alphabet) and decodes back exactly.

    Special tokens: <|endoftext|> (0), <|im_start|> (1), <|im_end|> (2, also EOS), <pad> (3, also PAD).
    """
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(corpus), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<pad>")
    tokenizer.chat_template = chat_template
    return tokenizer
