"""Turn sampled responses into a training Batch (both streams use this).

Layout (cipo_nemo/data/batch.py, cipo_nemo/models/interfaces.py): `input_ids` (N, T) = prompt + response,
right-padded; `prompt_mask` / `response_mask` (N, T); `generation_logprobs` (N, T) holds the sampler's logprob of
each response token at that token's position, 0 elsewhere. Per sample: `group_id` (one group per prompt),
`sample_kind`, `item_index` (which TaskItem of the step the sample answers), `response_text`, `finish_reason`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cipo_nemo.data.batch import Batch
from cipo_nemo.models.interfaces import SampledResponse


def responses_to_batch(
    prompt_ids: Sequence[list[int]],
    responses: Sequence[Sequence[SampledResponse]],
    *,
    item_indices: Sequence[int],
    sample_kind: str,
    tokenizer: Any,
) -> Batch:
    """One sample per response; prompt i's responses form group i; `item_indices[i]` is prompt i's item."""
    if not len(prompt_ids) == len(responses) == len(item_indices):
        raise ValueError(f"{len(prompt_ids)} prompts, {len(responses)} response lists, {len(item_indices)} items")
    rows = [
        (group, prompt, sample)
        for group, (prompt, samples) in enumerate(zip(prompt_ids, responses))
        for sample in samples
    ]
    width = max((len(prompt) + len(sample.token_ids) for _, prompt, sample in rows), default=1)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    response_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    generation_logprobs = torch.zeros((len(rows), width), dtype=torch.float32)
    for row, (_, prompt, sample) in enumerate(rows):
        start, end = len(prompt), len(prompt) + len(sample.token_ids)
        input_ids[row, :end] = torch.tensor(prompt + sample.token_ids, dtype=torch.long)
        prompt_mask[row, :start] = True
        response_mask[row, start:end] = True
        generation_logprobs[row, start:end] = torch.tensor(sample.logprobs, dtype=torch.float32)
    return Batch(
        {
            "input_ids": input_ids,
            "prompt_mask": prompt_mask,
            "response_mask": response_mask,
            "generation_logprobs": generation_logprobs,
            "group_id": torch.tensor([group for group, _, _ in rows], dtype=torch.long),
            "sample_kind": [sample_kind] * len(rows),
            "item_index": [item_indices[group] for group, _, _ in rows],
            "response_text": tokenizer.batch_decode([s.token_ids for _, _, s in rows], skip_special_tokens=True),
            "finish_reason": [sample.finish_reason for _, _, sample in rows],
        }
    )
