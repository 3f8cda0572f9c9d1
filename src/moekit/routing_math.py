"""Selection math shared by the architecture rules (``models/rules.py``) and the router zoo (``nn/routers.py``).

Written once here so that reproducing an architecture's router and building a new one cannot drift apart:
expert scores (softmax or sigmoid) and the distribution over experts they imply, renormalising the chosen
weights, top-p counting ("Harder Tasks Need More Experts"), and group-limited selection (DeepSeek-V2/V3).
Plain tensor functions on ``[T, E]`` rows, below both users in the layer order (torch only).
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")
SCORE_FUNCTIONS = ("softmax", "sigmoid")


def expert_scores(logits: torch.Tensor, score: str = "softmax") -> torch.Tensor:
    """Per-expert scores in fp32: ``softmax`` over the experts or an independent ``sigmoid`` per expert."""
    if score == "softmax":
        return torch.softmax(logits.float(), dim=-1)
    if score == "sigmoid":
        return logits.float().sigmoid()
    raise ValueError(f"unknown score function {score!r} (choices: {', '.join(SCORE_FUNCTIONS)})")


def score_distribution(scores: torch.Tensor, score: str = "softmax") -> torch.Tensor:
    """A probability distribution over experts from ``expert_scores``: softmax scores already are one;
    sigmoid scores are normalised to sum to 1 (DeepSeek-V3's affinities, as its balance loss uses them)."""
    if score == "softmax":
        return scores
    return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)


def renormalize(weights: torch.Tensor) -> torch.Tensor:
    """Chosen weights divided by their sum per token (``+ 1e-20``, as DeepSeek-V3 writes it: the same
    numbers as a plain division for any sum above ~1e-12, and 0 instead of NaN for a token with none)."""
    return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)


def softmax_of_chosen(logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k → softmax weights (GPT-OSS, GraniteMoE): softmax over the chosen experts' fp32 logits only
    (slots not ``valid`` take no share)."""
    chosen = logits.float().gather(-1, ids)
    if valid is not None:
        chosen = chosen.masked_fill(~valid, NEG_INF)
    return torch.softmax(chosen, dim=-1)


def top_p_keep(probs: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-p routing: ``(sorted probs, their expert order, keep)`` per row, descending; ``keep`` marks the
    experts up to and including the first whose cumulative probability exceeds ``p``."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the strictly better experts
    return sorted_p, order, before <= p


def top_p_counts(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Experts per token under top-p routing (``top_p_keep``'s kept count), at least 1."""
    return top_p_keep(probs, p)[2].sum(dim=-1).clamp(min=1, max=probs.shape[-1])


def group_scores(choice: torch.Tensor, n_group: int, rank: int = 2) -> torch.Tensor:
    """``[T, n_group]``: each group's score, the sum of its ``rank`` best expert scores (DeepSeek-V3: 2;
    DeepSeek-V2's ``group_limited_greedy``: 1, the group's best expert). Groups are equal, consecutive."""
    T, E = choice.shape
    if E % n_group:
        raise ValueError(f"num_experts={E} is not divisible by n_group={n_group}")
    grouped = choice.view(T, n_group, E // n_group)
    return grouped.topk(min(rank, grouped.shape[-1]), dim=-1).values.sum(dim=-1)


def kept_groups(choice: torch.Tensor, n_group: int, topk_group: int, k: int, rank: int = 2) -> torch.Tensor:
    """Bool ``[T, E]``: the experts in the ``topk_group`` best groups by ``group_scores``; more groups are
    kept when ``k`` experts need them (a routing control that raises k past what the groups hold)."""
    E = choice.shape[-1]
    size = E // n_group
    g = group_scores(choice, n_group, rank)
    n_keep = min(n_group, max(topk_group, -(-k // size)))
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(1, torch.topk(g, n_keep, dim=-1).indices, True)
    return keep.repeat_interleave(size, dim=1)


def group_limited_topk(
    scores: torch.Tensor, top_k: int, n_group: int, topk_group: int, group_rank: int = 2
) -> torch.Tensor:
    """Ids of the top-k ``scores [T,E]`` within the ``topk_group`` best of ``n_group`` equal groups.

    A group's score is the sum of its ``group_rank`` best scores (DeepSeek-V3: 2); other groups are masked with
    −inf (not 0, which would be wrong once biased scores go negative).
    """
    if n_group <= 1:
        return scores.topk(top_k, dim=-1).indices
    keep = kept_groups(scores, n_group, topk_group, top_k, group_rank)
    return scores.masked_fill(~keep, NEG_INF).topk(top_k, dim=-1).indices
