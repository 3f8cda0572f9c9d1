"""Token windows and batches, written once for every pass over text (trace, calibration, super-expert
profiling, perplexity): documents → token windows of at most ``seq_len`` tokens under a token budget →
batches (longest windows first where the caller wants little padding) → right padding with an attention mask.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import torch

from moekit.errors import MoekitError


class Window(NamedTuple):
    """A window of one document's tokens: the document's index, the first token's position, the token ids."""

    doc: int
    start: int
    ids: list[int]


def token_windows(token_lists: Iterable[Sequence[int]], seq_len: int, max_tokens: int | None = None,
                  overlap: int = 0) -> list[Window]:
    """Cut each document's token ids into windows of at most ``seq_len`` tokens, consecutive windows sharing
    ``overlap`` tokens, until ``max_tokens`` new tokens (tokens not in the previous window) are taken.

    ``overlap=0`` (trace, calibration, profiling) covers every token once; ``overlap=1`` (perplexity) lets every
    token but a document's first be predicted exactly once, and skips documents shorter than 2 tokens. The last
    window is cut to the budget; ``token_lists`` is read lazily, so no document past the budget is tokenized.
    """
    if seq_len <= overlap:
        raise MoekitError(f"seq_len must be at least {overlap + 1}")
    budget = math.inf if max_tokens is None else max_tokens
    out: list[Window] = []
    if budget <= 0:
        return out
    for d, ids in enumerate(token_lists):
        for start in range(0, max(len(ids) - overlap, 0), seq_len - overlap):
            w = list(ids[start:start + seq_len])
            if len(w) - overlap > budget:
                w = w[: int(budget) + overlap]
            out.append(Window(d, start, w))
            budget -= len(w) - overlap
            if budget <= 0:
                return out
    return out


def document_token_ids(tokenizer: Any, docs: Iterable[Any]) -> Iterator[list[int]]:
    """Token ids of each document (an object with ``text``, or a string), without special tokens, lazily."""
    for doc in docs:
        text = doc if isinstance(doc, str) else doc.text
        yield list(tokenizer(text, add_special_tokens=False)["input_ids"])


def text_windows(tokenizer: Any, docs: Iterable[Any], seq_len: int, max_tokens: int | None = None,
                 overlap: int = 0) -> list[Window]:
    """``token_windows`` of documents tokenized with ``tokenizer`` (see ``document_token_ids``)."""
    return token_windows(document_token_ids(tokenizer, docs), seq_len, max_tokens, overlap)


def document_windows(ids: Sequence[int], seq_len: int) -> list[list[int]]:
    """One document's token ids in windows of ``seq_len`` overlapping by one token (perplexity's windows)."""
    return [w.ids for w in token_windows([ids], seq_len, overlap=1)]


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Window indices in batches of ``batch_size``, longest windows first (equal lengths keep their order):
    windows of similar length share a batch, so little of it is padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[b:b + batch_size] for b in range(0, len(order), batch_size)]


def pad_batch(chunks: Sequence[Sequence[int]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` for a list of token lists."""
    width = max(len(c) for c in chunks)
    ids = torch.full((len(chunks), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunks), width), dtype=torch.long)
    for i, c in enumerate(chunks):
        ids[i, : len(c)] = torch.as_tensor(list(c), dtype=torch.long)
        mask[i, : len(c)] = 1
    return {"input_ids": ids, "attention_mask": mask}
