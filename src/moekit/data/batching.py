"""Batching token windows: right padding with an attention mask."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_batch(chunks: Sequence[Sequence[int]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` for a list of token lists."""
    width = max(len(c) for c in chunks)
    ids = torch.full((len(chunks), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunks), width), dtype=torch.long)
    for i, c in enumerate(chunks):
        ids[i, : len(c)] = torch.as_tensor(list(c), dtype=torch.long)
        mask[i, : len(c)] = 1
    return {"input_ids": ids, "attention_mask": mask}
