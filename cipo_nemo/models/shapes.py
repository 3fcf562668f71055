"""Model shapes for the launch plan: a checkpoint's config.json, or a table of published architectures.

The dry run (cipo_nemo/plan.py) needs only these numbers, never weights, so a 70B layout can be checked on a
laptop before the job waits in a queue.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cipo_nemo.models.hub import ModelNotFoundError, find_local_model_dir


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a decoder: the fields of its Hugging Face config.json."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    dtype_bytes: int = 2  # torch_dtype of the checkpoint (bf16 for every model in KNOWN_MODELS)

    def layer_params(self) -> int:
        h, qd, kvd = self.hidden_size, self.num_attention_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return 2 * h * qd + 2 * h * kvd + 3 * h * self.ffn_hidden_size + 2 * h  # q,o + k,v + gated MLP + 2 norms

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def total_params(self) -> int:
        # L * layer + embedding (+ separate output layer when untied) + final norm
        outputs = 1 if self.tied_embeddings else 2
        return self.num_layers * self.layer_params() + outputs * self.embedding_params() + self.hidden_size

    def describe(self) -> str:
        return (f"{self.num_layers} layers, hidden {self.hidden_size}, ffn {self.ffn_hidden_size}, "
                f"{self.num_attention_heads} heads, {self.num_kv_heads} KV heads, head dim {self.head_dim}, "
                f"vocab {self.vocab_size}{', tied embeddings' if self.tied_embeddings else ''}, "
                f"{format_params(self.total_params())} parameters")


_LLAMA3_70B = ModelShape(num_layers=80, hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64,
                         num_kv_heads=8, head_dim=128, vocab_size=128256, tied_embeddings=False)
_LLAMA3_8B = ModelShape(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                        num_kv_heads=8, head_dim=128, vocab_size=128256, tied_embeddings=False)
_SEED_CODER_8B = ModelShape(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                            num_kv_heads=8, head_dim=128, vocab_size=155136, tied_embeddings=False)
_QWEN3_4B = ModelShape(num_layers=36, hidden_size=2560, ffn_hidden_size=9728, num_attention_heads=32,
                       num_kv_heads=8, head_dim=128, vocab_size=151936, tied_embeddings=True)
_QWEN3_8B = ModelShape(num_layers=36, hidden_size=4096, ffn_hidden_size=12288, num_attention_heads=32,
                       num_kv_heads=8, head_dim=128, vocab_size=151936, tied_embeddings=False)
_QWEN25_7B = ModelShape(num_layers=28, hidden_size=3584, ffn_hidden_size=18944, num_attention_heads=28,
                        num_kv_heads=4, head_dim=128, vocab_size=152064, tied_embeddings=False)
_SMOLLM2_135M = ModelShape(num_layers=30, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9,
                           num_kv_heads=3, head_dim=64, vocab_size=49152, tied_embeddings=True)

# Architectures of public checkpoints, copied from their published config.json, for dry runs where the weights
# are not (a login node, a laptop). A local checkpoint directory always wins over this table.
KNOWN_MODELS: dict[str, ModelShape] = {
    "meta-llama/Llama-3.3-70B-Instruct": _LLAMA3_70B,
    "meta-llama/Llama-3.1-70B-Instruct": _LLAMA3_70B,
    "meta-llama/Llama-3.1-70B": _LLAMA3_70B,
    "meta-llama/Llama-3.1-8B-Instruct": _LLAMA3_8B,
    "meta-llama/Llama-3.1-8B": _LLAMA3_8B,
    "ByteDance-Seed/Seed-Coder-8B-Instruct": _SEED_CODER_8B,
    "ByteDance-Seed/Seed-Coder-8B-Base": _SEED_CODER_8B,
    "ByteDance-Seed/Seed-Coder-8B-Reasoning": _SEED_CODER_8B,
    "Qwen/Qwen3-4B": _QWEN3_4B,
    "Qwen/Qwen3-8B": _QWEN3_8B,
    "Qwen/Qwen2.5-7B-Instruct": _QWEN25_7B,
    "Qwen/Qwen2.5-7B": _QWEN25_7B,
    "HuggingFaceTB/SmolLM2-135M-Instruct": _SMOLLM2_135M,
}

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def shape_from_config_json(path: Path) -> ModelShape:
    """The shape from a checkpoint's config.json (Llama, Qwen2/3, Mistral field names)."""
    config = json.loads(path.read_text())
    heads = config["num_attention_heads"]
    return ModelShape(
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        ffn_hidden_size=config["intermediate_size"],
        num_attention_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,  # absent in MHA configs: one KV head per head
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,  # Qwen3 sets it; Llama derives it
        vocab_size=config["vocab_size"],
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),  # transformers' default is untied
        dtype_bytes=_DTYPE_BYTES.get(str(config.get("torch_dtype") or config.get("dtype")), 2),
    )


def find_model_shape(name: str, revision: str | None = None) -> tuple[ModelShape, str]:
    """(shape, where it came from): the local checkpoint's config.json, else the table of public models."""
    local = find_local_model_dir(name, revision)
    if local is not None:
        return shape_from_config_json(local / "config.json"), f"{local / 'config.json'}"
    if name in KNOWN_MODELS:
        return KNOWN_MODELS[name], "architecture from the built-in table of published config.json values"
    raise ModelNotFoundError(
        f"policy.model_name: {name!r} is not a local checkpoint directory, not in the Hugging Face cache, "
        f"and not a model whose architecture the dry run knows ({', '.join(sorted(KNOWN_MODELS))}); "
        "pass the checkpoint's directory (its config.json is all the dry run reads), or train without --dry-run, "
        "which downloads it first"
    )


def format_params(count: int) -> str:
    """1.23B or 135.0M."""
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"
