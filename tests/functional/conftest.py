"""Shared fixtures for functional tests: a tiny model warm-started on one-digit sums, and its data files.

The warm start makes a random tiny model answer "#### n" with a mix of right and wrong sums, so RL steps see
real rewards of both kinds (anchors of both kinds, retention and correction success defined).
"""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from cipo_nemo.models.tiny import build_tiny_model_dir, build_tiny_tokenizer, warm_start_tiny_model

SUMS = [(a, b) for a in range(5) for b in range(5)]
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class ArithmeticModel:
    model_dir: Path
    train_file: Path
    validation_file: Path


def _question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


@pytest.fixture(scope="session")
def arithmetic_model(tmp_path_factory) -> ArithmeticModel:
    root = tmp_path_factory.mktemp("arithmetic")
    corpus = [f"{_question(a, b)} #### {a + b}" for a, b in SUMS] + [INSTRUCTION]
    tokenizer = build_tiny_tokenizer(corpus)
    model_dir = build_tiny_model_dir(root / "model", tokenizer=tokenizer, tie_word_embeddings=True)

    def render(question: str) -> str:
        text = f"{question}\n\n{INSTRUCTION}"  # what problem_text() produces for a math item
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)

    warm_start_tiny_model(model_dir, [(render(_question(a, b)), f"#### {a + b}") for a, b in SUMS], steps=120)
    train_file, validation_file = root / "train.jsonl", root / "validation.jsonl"
    for path, pairs in ((train_file, SUMS), (validation_file, SUMS[::3])):
        path.write_text("".join(json.dumps({"prompt": _question(a, b), "answer": str(a + b)}) + "\n" for a, b in pairs))
    return ArithmeticModel(model_dir=model_dir, train_file=train_file, validation_file=validation_file)
