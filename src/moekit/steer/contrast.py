"""Self-contrast decoding for MoE models (SCMoE, Shi et al. 2024): the strong routing (the model's own
top-k) against a weak routing of the same model (default top-1).

At each step ``z = (1+β)·log p_strong − β·log p_weak`` on the plausible tokens (``log p_strong ≥
max log p_strong + log α``); implausible tokens get −inf. Using log-probabilities or raw logits gives
the same distribution (they differ by a per-step constant). Each routing keeps its own KV cache.
"""

from __future__ import annotations

import math

import torch

from moekit.errors import MoekitError
from moekit.generation import Decoder
from moekit.models.loading import LoadedModel
from moekit.routing import route


def contrast_logits(z_strong: torch.Tensor, z_weak: torch.Tensor, beta: float, alpha: float = 0.1) -> torch.Tensor:
    """``(1+β)·log p_strong − β·log p_weak`` where ``p_strong ≥ α·max p_strong``, else −inf."""
    if beta < 0:
        raise MoekitError(f"contrast strength beta must be >= 0, got {beta}")
    if not 0 < alpha <= 1:
        raise MoekitError(f"plausibility alpha must be in (0, 1], got {alpha}")
    ls = torch.log_softmax(z_strong.float(), dim=-1)
    lw = torch.log_softmax(z_weak.float(), dim=-1)
    plausible = ls >= ls.max(dim=-1, keepdim=True).values + math.log(alpha)
    z = (1 + beta) * ls - beta * lw if beta else ls
    return z.masked_fill(~plausible, float("-inf"))


class ContrastDecoder(Decoder):
    """SCMoE: strong (model's routing, plus any outer control) vs weak (``weak_top_k`` experts) routing."""

    def __init__(self, lm: LoadedModel, beta: float = 0.5, alpha: float = 0.1, weak_top_k: int = 1) -> None:
        super().__init__(lm)
        if beta < 0:
            raise MoekitError(f"contrast strength beta must be >= 0, got {beta}")
        if not 0 < alpha <= 1:
            raise MoekitError(f"plausibility alpha must be in (0, 1], got {alpha}")
        self.beta, self.alpha, self.weak_top_k = float(beta), float(alpha), int(weak_top_k)
        self.weak = Decoder(lm)
        self.stats = {"beta": self.beta, "alpha": self.alpha, "weak_top_k": self.weak_top_k, "changed": 0, "steps": 0}

    def _combine(self, zs: torch.Tensor, zw: torch.Tensor) -> torch.Tensor:
        z = contrast_logits(zs, zw, self.beta, self.alpha)
        self.stats["steps"] += 1
        self.stats["changed"] += int(int(z.argmax()) != int(zs.argmax()))
        return z

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        zs = super().prefill(ids)
        with route(self.lm, top_k=self.weak_top_k):
            zw = self.weak.prefill(ids)
        return self._combine(zs, zw)

    def step(self, token: int) -> torch.Tensor:
        zs = super().step(token)
        with route(self.lm, top_k=self.weak_top_k):
            zw = self.weak.step(token)
        return self._combine(zs, zw)
