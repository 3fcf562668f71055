"""A reward for smoke tests of studies on a random tiny model (`verifier.custom=tests.functional.study_rewards:coin`).

A random model never writes the right sum, so a study's correction set (problems where the start model made both a
wrong and a right attempt) would be empty. This reward calls about half of all responses right, by a hash of their
text: deterministic, the same in the trainer and the evaluation harness, and unrelated to arithmetic.
"""

from __future__ import annotations

import zlib


def coin(items, responses):
    return [(1.0, "heads") if zlib.crc32(text.encode()) % 2 else (0.0, "tails") for text in responses]
