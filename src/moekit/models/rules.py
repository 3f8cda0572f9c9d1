"""Selection rules: how each architecture turns router logits into (weights, expert ids).

Each rule reproduces an architecture's router exactly and can re-derive the selection under a
routing control (design §3): experts disabled (never selected), forced (always selected), a number
of experts per token other than the model's k (``top_k``), or a per-token number from router mass
(``top_p``). Slots that select nothing carry the expert id of the token's first choice and weight 0,
which every experts implementation treats as "no contribution"; ``valid`` marks the real slots.

Names say the order: ``softmax_then_topk`` (softmax over all experts, then top-k) and ``topk_then_softmax``
(top-k on the logits, softmax over the k) — the same names ``moekit.nn.ROUTERS`` uses for the same orders.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.registry import Registry
from moekit.routing_math import (
    NEG_INF,
    expert_scores,
    kept_groups,
    renormalize,
    score_distribution,
    softmax_of_chosen,
    top_p_counts,
)

RULES: Registry[type[Rule]] = Registry("selection rule")


@dataclass
class Selection:
    """The outcome of a rule: ids [T, K], weights [T, K] (0 where not valid), valid [T, K] bool."""

    ids: torch.Tensor
    weights: torch.Tensor
    valid: torch.Tensor


class Rule:
    """Base selection rule. Subclasses define scores, the selection key and the weights."""

    name = "rule"
    formula = ""  # what the rule computes, without its numbers (the support table reads it from RULES)

    def __init__(self, router: torch.nn.Module, config) -> None:
        self.top_k = int(getattr(router, "top_k", None) or getattr(config, "num_experts_per_tok", 0) or 0)

    # --- pieces an architecture defines ---------------------------------------------------------
    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-expert scores the weights are taken from (fp32)."""
        return expert_scores(logits, "softmax")

    def choice(self, scores: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The key experts are selected by (may add a selection-only bias)."""
        return scores

    def limit_groups(self, choice: torch.Tensor, k: int) -> torch.Tensor:
        """Group-limited routing masks experts outside the chosen groups; default: no groups."""
        return choice

    def weights(self, scores: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor):
        raise NotImplementedError

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """A probability distribution over experts per token (for traces and top-p)."""
        return self.scores(logits)

    @property
    def renormalize(self) -> bool:
        return False

    # --- the shared selection procedure ---------------------------------------------------------
    def select(
        self,
        logits: torch.Tensor,
        top_k: int | None = None,
        disable: torch.Tensor | None = None,
        force: torch.Tensor | None = None,
        logit_bias: torch.Tensor | None = None,
        top_p: float | None = None,
    ) -> Selection:
        """Select experts for each row of ``logits`` [T, E] under the given control.

        ``disable``/``force`` are bool [E]; ``logit_bias`` is added to the logits before anything else.
        """
        logits = logits.float()
        if logit_bias is not None:
            logits = logits + logit_bias
        if disable is not None and disable.any():
            logits = logits.masked_fill(disable, NEG_INF)
        scores = self.scores(logits)
        key = self.choice(scores, logits)
        if disable is not None and disable.any():
            key = key.masked_fill(disable, NEG_INF)
        if force is not None and force.any():
            key = key.masked_fill(force, float("inf"))
        E = logits.shape[-1]
        k = min(top_k or self.top_k, E)
        if top_p is not None:
            counts = top_p_counts(self.probs(logits), top_p)
            if force is not None:
                counts = torch.maximum(counts, force.sum().expand_as(counts))
            k = int(counts.max())
        key = self.limit_groups(key, k)
        key_vals, ids = torch.topk(key, k, dim=-1)
        valid = key_vals > NEG_INF
        if top_p is not None:
            valid &= torch.arange(k, device=ids.device) < counts.unsqueeze(-1)
        ids = torch.where(valid, ids, ids[:, :1])
        w = self.weights(scores, logits, ids, valid)
        return Selection(ids=ids, weights=torch.where(valid, w, torch.zeros_like(w)), valid=valid)

    def describe(self) -> str:
        return self.name


@RULES.register("softmax_then_topk")
class SoftmaxTopK(Rule):
    """softmax over experts → top-k → optional renormalisation → optional scaling
    (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2 greedy)."""

    name = "softmax_then_topk"
    formula = "softmax → top-k"

    def __init__(self, router, config, renormalize: bool | None = None, scaling: float = 1.0) -> None:
        super().__init__(router, config)
        self._renorm = bool(getattr(router, "norm_topk_prob", False) if renormalize is None else renormalize)
        self.scaling = float(scaling)

    @property
    def renormalize(self) -> bool:
        return self._renorm

    def weights(self, scores, logits, ids, valid):
        w = scores.gather(1, ids).masked_fill(~valid, 0.0)
        if self._renorm:
            w = renormalize(w)
        return w * self.scaling if self.scaling != 1.0 else w

    def describe(self) -> str:
        s = "softmax → top-k" + (" → renorm" if self._renorm else "")
        return s + (f" × {self.scaling:g}" if self.scaling != 1.0 else "")


@RULES.register("softmax_group_max")
class SoftmaxGroupMax(SoftmaxTopK):
    """DeepSeek-V2 ``group_limited_greedy``: keep the top groups by their best expert, then top-k."""

    name = "softmax_group_max"
    formula = "softmax → group-limited top-k (group max) × scale"

    def __init__(self, router, config, renormalize=None, scaling=1.0) -> None:
        super().__init__(router, config, renormalize=renormalize, scaling=scaling)
        self.n_group = int(router.num_group)
        self.topk_group = int(router.topk_group)

    def limit_groups(self, choice, k):
        keep = kept_groups(choice, self.n_group, self.topk_group, k, rank=1)
        # DeepSeek-V2 fills dropped groups with score 0, so such an expert, if ever picked, gets weight 0;
        # -inf gives the same output and records the slot as empty
        return choice.masked_fill(~keep, NEG_INF)

    def describe(self) -> str:
        return f"softmax → group-limited top-k ({self.topk_group}/{self.n_group} groups, max) × {self.scaling:g}"


@RULES.register("topk_then_softmax")
class TopKSoftmax(Rule):
    """top-k on the logits → softmax over the k chosen (GPT-OSS, GraniteMoE)."""

    name = "topk_then_softmax"
    formula = "top-k on logits → softmax over k"

    def scores(self, logits):
        return logits.float()

    def probs(self, logits):
        return expert_scores(logits, "softmax")

    def weights(self, scores, logits, ids, valid):
        return softmax_of_chosen(logits, ids, valid)

    @property
    def renormalize(self) -> bool:
        return True

    def describe(self) -> str:
        return "top-k on logits → softmax over k"


@RULES.register("sparsemixer")
class SparseMixer(Rule):
    """PhiMoE SparseMixer (inference): pick experts one at a time by score; each weight is the softmax of
    the remaining scores within a relative jitter band of the picked one."""

    name = "sparsemixer"
    formula = "sparsemixer"

    def __init__(self, router, config) -> None:
        super().__init__(router, config)
        self.eps = float(getattr(router, "router_jitter_noise", 0.01))

    def scores(self, logits):
        return logits.float()

    def probs(self, logits):
        return expert_scores(logits, "softmax")

    def select(self, logits, top_k=None, disable=None, force=None, logit_bias=None, top_p=None):
        scores = logits.float()
        if logit_bias is not None:
            scores = scores + logit_bias
        if disable is not None and disable.any():
            scores = scores.masked_fill(disable, NEG_INF)
        E = scores.shape[-1]
        k = min(top_k or self.top_k, E)
        counts = None
        if top_p is not None:
            counts = top_p_counts(self.probs(scores), top_p)
            k = int(counts.max())
        key = scores if force is None else scores.masked_fill(force, float("inf"))
        remaining = scores
        ids, ws, valids = [], [], []
        for _ in range(k):
            pick = key.argmax(dim=-1, keepdim=True)
            top = remaining.gather(1, pick)
            factor = scores.abs().clamp(min=top)
            outside = ((top - scores) / factor) > (2 * self.eps)
            gates = torch.softmax(remaining.masked_fill(outside, NEG_INF), dim=-1)
            ids.append(pick)
            ws.append(gates.gather(1, pick))
            valids.append(top > NEG_INF)
            remaining = remaining.scatter(1, pick, NEG_INF)
            key = key.scatter(1, pick, NEG_INF)
        ids_t, w, valid = torch.cat(ids, 1), torch.cat(ws, 1), torch.cat(valids, 1)
        if counts is not None:
            valid &= torch.arange(k, device=ids_t.device) < counts.unsqueeze(-1)
        ids_t = torch.where(valid, ids_t, ids_t[:, :1])
        w = torch.where(valid, torch.nan_to_num(w, nan=0.0), torch.zeros_like(w))
        return Selection(ids=ids_t, weights=w, valid=valid)

    def describe(self) -> str:
        return f"sparsemixer (sequential top-k, jitter {self.eps:g})"


@RULES.register("scored_topk")
class ScoredTopK(Rule):
    """A softmax or sigmoid score per expert; optionally a selection-only bias added to it and a group limit;
    top-k; weights are the unbiased scores of the chosen experts, optionally renormalised, × scaling.

    One parametrised rule for the routers of 2025-26 (MiniMax-M2, AFMoE, LFM2-MoE, ERNIE-4.5, LongCat-Flash,
    Llama 4): each registry entry in ``models.moe_map`` states its parameters from the modeling code.
    """

    name = "scored_topk"

    def __init__(self, router, config, *, score: str = "softmax", bias: torch.Tensor | None = None,
                 renormalize: bool = True, scaling: float = 1.0, n_group: int = 1, topk_group: int = 1,
                 top_k: int | None = None, expert_scale: torch.Tensor | None = None,
                 bias_on_logits: bool = False) -> None:
        super().__init__(router, config)
        if top_k is not None:
            self.top_k = int(top_k)
        expert_scores(torch.zeros(1, 1), score)  # an unknown score function fails here, not at the first forward
        self.score = score
        self._bias = bias
        self._renorm = bool(renormalize)
        self.scaling = float(scaling)
        self.n_group, self.topk_group = int(n_group), int(topk_group)
        self.expert_scale = expert_scale  # a learned factor per expert on its final weight (Gemma 4)
        self.bias_on_logits = bool(bias_on_logits)  # selection key = logits + bias (Kolibri) instead of scores + bias

    @property
    def renormalize(self) -> bool:
        return self._renorm

    @property
    def bias(self) -> torch.Tensor | None:
        """The selection-only bias (None: selection by the scores themselves)."""
        return self._bias

    def scores(self, logits):
        return expert_scores(logits, self.score)

    def probs(self, logits):
        return score_distribution(self.scores(logits), self.score)

    def choice(self, scores, logits):
        if self.bias is None:
            return scores
        return (logits.float() if self.bias_on_logits else scores) + self.bias.float().reshape(-1)

    def limit_groups(self, choice, k):
        if self.n_group <= 1:
            return choice
        # without a selection bias a disabled expert scores 0 in its group (its probability), as the router
        # itself computes with that expert's logit at -inf; with one, the bias at -inf makes the group -inf
        grouped = choice if self.bias is not None else choice.masked_fill(choice == NEG_INF, 0.0)
        keep = kept_groups(grouped, self.n_group, self.topk_group, k)
        return choice.masked_fill(~keep, NEG_INF)

    def weights(self, scores, logits, ids, valid):
        w = scores.gather(1, ids).masked_fill(~valid, 0.0)
        if self._renorm:
            w = renormalize(w)
        if self.expert_scale is not None:
            w = w * self.expert_scale.float()[ids]
        return w * self.scaling if self.scaling != 1.0 else w

    def describe(self) -> str:
        s = self.score + (" + selection bias" if self.bias is not None and not self.bias_on_logits else "")
        s += " (selection: logits + bias)" if self.bias is not None and self.bias_on_logits else ""
        s += " → "
        s += f"group-limited top-k ({self.topk_group}/{self.n_group} groups)" if self.n_group > 1 else "top-k"
        s += " → renorm" if self._renorm else ""
        s += " × per-expert scale" if self.expert_scale is not None else ""
        return s + (f" × {self.scaling:g}" if self.scaling != 1.0 else "")


@RULES.register("sigmoid_group")
class SigmoidGroup(ScoredTopK):
    """DeepSeek-V3: sigmoid scores; a selection-only correction bias; group-limited top-k (group score =
    sum of its two best biased scores); weights from the unbiased scores, renormalised, × scaling.

    ``ScoredTopK`` with the router's own parameters; the bias is read from the router at every call, so a
    bias updated or moved with the model is the one used."""

    name = "sigmoid_group"
    formula = "sigmoid + selection bias → group-limited top-k → renorm × scale"

    def __init__(self, router, config) -> None:
        super().__init__(router, config, score="sigmoid", renormalize=bool(router.norm_topk_prob),
                         scaling=float(router.routed_scaling_factor), n_group=int(router.num_group),
                         topk_group=int(router.topk_group))
        self.router = router

    @property
    def bias(self) -> torch.Tensor:
        return self.router.e_score_correction_bias

    def describe(self) -> str:
        return (f"sigmoid + selection bias → group-limited top-k ({self.topk_group}/{self.n_group} groups)"
                + (" → renorm" if self._renorm else "") + f" × {self.scaling:g}")
