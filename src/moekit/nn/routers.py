"""Routers of the MoE literature behind one interface, in a registry.

Every router maps ``x [T,H]`` (or ``[B,S,H]``, flattened) to ``RouterOutput(logits, weights [T,k], ids [T,k],
aux)``. An id equal to E (the number of real experts) means "no expert": the dispatch skips it, which is how
top-p, null experts and dropped slots are expressed. Logits and weights are fp32. ``aux`` holds unscaled
per-layer losses; ``router.aux_loss(aux)`` weighs them with the router's coefficients.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moekit.nn.dispatch import expert_counts
from moekit.nn.losses import seq_balance_loss, switch_balance_loss, z_loss
from moekit.registry import Registry
from moekit.routing_math import (
    expert_scores,
    group_limited_topk,
    renormalize,
    score_distribution,
    softmax_of_chosen,
    top_p_keep,
)

ROUTERS: Registry[type[Router]] = Registry("router")


class RouterOutput(NamedTuple):
    """What a router decides: raw logits, the weights and ids of the chosen experts, and its aux losses."""

    logits: torch.Tensor
    weights: torch.Tensor
    ids: torch.Tensor
    aux: dict[str, torch.Tensor]


class Router(nn.Module):
    """Base router: a bias-free linear gate in fp32, per-layer aux losses, per-expert load counters.

    Subclasses implement ``select(logits) -> (weights, ids, probs, balance_ids, balance_n)``: ``probs`` and
    ``balance_ids`` over ``balance_n`` slots feed the balance losses (null experts balance over E+N).
    """

    def __init__(
        self,
        hidden: int,
        num_experts: int,
        top_k: int,
        *,
        balance_coef: float = 0.0,
        seq_coef: float = 0.0,
        z_coef: float = 0.0,
        num_logits: int | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.hidden, self.num_experts, self.top_k = hidden, num_experts, top_k
        self.coefs = {"balance": balance_coef, "seq_balance": seq_coef, "z": z_coef}
        self.weight = nn.Parameter(torch.empty(num_logits or num_experts, hidden))
        nn.init.normal_(self.weight, std=hidden**-0.5)
        self.register_buffer(
            "tokens_per_expert", torch.zeros(num_experts, dtype=torch.long), persistent=False
        )
        # Balancing rules use loads summed over the ranks of ``load_group``: a torch.distributed group, or "world"
        # for the default group (looked up at each call, so a model kept alive does not keep the group alive past
        # the job's end: see docs/distributed.md); None: this process's loads alone.
        self.load_group = None

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits in fp32 (routing decisions are precision-sensitive)."""
        return F.linear(x.float(), self.weight.float())

    def select(
        self, logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> RouterOutput:
        """Route ``x [..., H]``; ``mask`` (same leading shape, True = real token) excludes padding from the losses."""
        lead = x.shape[:-1]
        logits = self.compute_logits(x.reshape(-1, x.shape[-1]))
        weights, ids, probs, bal_ids, bal_n = self.select(logits)
        aux: dict[str, torch.Tensor] = {}
        if self.coefs["balance"] or not self.training:
            aux["balance"] = switch_balance_loss(probs, bal_ids, bal_n, mask)
        if self.coefs["seq_balance"]:
            seq_shape = (lead[0], -1) if len(lead) == 2 else (1, -1)
            aux["seq_balance"] = seq_balance_loss(
                probs.reshape(*seq_shape, probs.shape[-1]),
                bal_ids.reshape(*seq_shape, bal_ids.shape[-1]),
                bal_n,
                mask,
                top_k=self.top_k,
            )
        if self.coefs["z"]:
            aux["z"] = z_loss(logits, mask)
        with torch.no_grad():
            self.tokens_per_expert += expert_counts(ids, self.num_experts)
        return RouterOutput(logits, weights, ids, aux)

    def aux_loss(self, aux: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """``Σ coef · aux[name]`` over the losses this router is configured to train with, or None."""
        terms = [self.coefs[name] * value for name, value in aux.items() if self.coefs.get(name)]
        return torch.stack(terms).sum() if terms else None

    def reset_counts(self) -> torch.Tensor:
        """Return the per-expert token counts accumulated since the last reset, and zero them."""
        counts = self.tokens_per_expert.clone()
        self.tokens_per_expert.zero_()
        return counts

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, num_experts={self.num_experts}, top_k={self.top_k}"


@ROUTERS.register("softmax_then_topk")
class SoftmaxThenTopKRouter(Router):
    """Softmax over all experts, then top-k, optionally renormalised (Mixtral, Qwen-MoE, OLMoE, Switch)."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, *, renorm: bool = True, **kw) -> None:
        super().__init__(hidden, num_experts, top_k, **kw)
        self.renorm = renorm

    def select(self, logits: torch.Tensor):
        probs = expert_scores(logits, "softmax")
        weights, ids = probs.topk(self.top_k, dim=-1)
        if self.renorm:
            weights = renormalize(weights)
        return weights, ids, probs, ids, self.num_experts


@ROUTERS.register("topk_then_softmax")
class TopKThenSoftmaxRouter(Router):
    """Top-k on the logits, softmax over the k chosen (GPT-OSS, GraniteMoE)."""

    def select(self, logits: torch.Tensor):
        ids = logits.topk(self.top_k, dim=-1).indices
        return softmax_of_chosen(logits, ids), ids, expert_scores(logits, "softmax"), ids, self.num_experts


# Before the rename this registry called softmax-then-top-k "topk_softmax", the opposite of what the name says
# (and of models.RULES). Configs saved with it still load: the old name reads as the new one.
ROUTERS.alias("topk_softmax", "softmax_then_topk", note="renamed: the order is softmax, then top-k")


@ROUTERS.register("sigmoid_bias")
class SigmoidBiasRouter(Router):
    """DeepSeek-V3: sigmoid scores; a selection-only fp32 bias; group-limited top-k; renorm; routed scaling.

    The bias ``e_score_correction_bias`` only changes which experts are picked; weights come from the unbiased
    scores. ``update_bias`` applies the aux-loss-free rule ``b_e += u · sign(mean_load − load_e)``.
    """

    def __init__(
        self,
        hidden: int,
        num_experts: int,
        top_k: int,
        *,
        n_group: int = 1,
        topk_group: int = 1,
        routed_scaling: float = 1.0,
        renorm: bool = True,
        bias_update_rate: float = 1e-3,
        auto_update: bool = False,
        **kw,
    ) -> None:
        super().__init__(hidden, num_experts, top_k, **kw)
        if n_group > 1 and topk_group * (num_experts // n_group) < top_k:
            raise ValueError("topk_group groups hold fewer than top_k experts")
        self.n_group, self.topk_group = n_group, topk_group
        self.routed_scaling, self.renorm = routed_scaling, renorm
        self.bias_update_rate, self.auto_update = bias_update_rate, auto_update
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))

    def select(self, logits: torch.Tensor):
        scores = expert_scores(logits, "sigmoid")
        choice = scores + self.e_score_correction_bias
        ids = group_limited_topk(choice, self.top_k, self.n_group, self.topk_group)
        weights = scores.gather(1, ids)
        if self.renorm:
            weights = renormalize(weights)
        weights = weights * self.routed_scaling
        probs = score_distribution(scores, "sigmoid")  # normalised affinities for the balance losses
        if self.auto_update and self.training:
            self.update_bias(expert_counts(ids, self.num_experts))
        return weights, ids, probs, ids, self.num_experts

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor | None = None, u: float | None = None) -> torch.Tensor:
        """Aux-loss-free balancing step (Megatron rule) from per-expert ``counts`` (default: accumulated ones)."""
        if counts is None:
            counts = self.reset_counts()
        if self.load_group is not None:  # expert / data parallel: balance on the loads of all ranks
            import torch.distributed as dist

            counts = counts.clone()
            dist.all_reduce(counts, group=None if isinstance(self.load_group, str) else self.load_group)
        load = counts.to(self.e_score_correction_bias.device, torch.float32)
        rate = self.bias_update_rate if u is None else u
        self.e_score_correction_bias += rate * torch.sign(load.mean() - load)
        return self.e_score_correction_bias


@ROUTERS.register("aux_free")
class AuxFreeRouter(SigmoidBiasRouter):
    """DeepSeek-V3 aux-loss-free balancing: ``sigmoid_bias`` whose bias updates itself on every training step."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, *, auto_update: bool = True, **kw) -> None:
        super().__init__(hidden, num_experts, top_k, auto_update=auto_update, **kw)


@ROUTERS.register("top_p")
class TopPRouter(Router):
    """Dynamic routing ("Harder Tasks Need More Experts"): keep the most probable experts until their sum exceeds p.

    Experts are kept up to and including the first whose cumulative probability exceeds ``p``; weights are the
    raw probabilities (not renormalised). Output width is ``max_k`` (default E), trimmed to the widest row in
    the batch when ``trim`` (one host sync); unused slots get id E and weight 0.
    """

    def __init__(
        self,
        hidden: int,
        num_experts: int,
        top_k: int = 1,
        *,
        p: float = 0.4,
        max_k: int | None = None,
        trim: bool = True,
        **kw,
    ) -> None:
        super().__init__(hidden, num_experts, top_k, **kw)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"p must be in (0, 1], got {p}")
        self.p, self.max_k, self.trim = p, max_k or num_experts, trim

    def select(self, logits: torch.Tensor):
        probs = expert_scores(logits, "softmax")
        sorted_p, order, keep = top_p_keep(probs, self.p)
        keep[:, self.max_k :] = False
        width = self.max_k
        if self.trim:
            width = max(1, int(keep.sum(-1).max()))
        keep, order, sorted_p = keep[:, :width], order[:, :width], sorted_p[:, :width]
        ids = torch.where(keep, order, self.num_experts)
        weights = torch.where(keep, sorted_p, 0.0)
        return weights, ids, probs, ids, self.num_experts


@ROUTERS.register("null_experts")
class NullExpertsRouter(Router):
    """AdaMoE: N extra "null" logits; softmax over E+N; top-k; null picks compute nothing (id E).

    Real-expert weights are renormalised to sum to 1 (all-null tokens get zero weights); the balance loss runs
    over all E+N slots so null usage is balanced too.
    """

    def __init__(self, hidden: int, num_experts: int, top_k: int, *, num_null: int = 4, **kw) -> None:
        super().__init__(
            hidden, num_experts, min(top_k, num_experts), num_logits=num_experts + num_null, **kw
        )
        if top_k > num_experts + num_null:
            raise ValueError(f"top_k={top_k} exceeds num_experts + num_null = {num_experts + num_null}")
        self.top_k, self.num_null = top_k, num_null

    def select(self, logits: torch.Tensor):
        probs = expert_scores(logits, "softmax")
        top_p, raw_ids = probs.topk(self.top_k, dim=-1)
        real = raw_ids < self.num_experts
        weights = renormalize(torch.where(real, top_p, 0.0))  # all-null tokens: zero weights
        ids = torch.where(real, raw_ids, self.num_experts)
        return weights, ids, probs, raw_ids, self.num_experts + self.num_null


@ROUTERS.register("random_fixed")
class RandomFixedRouter(Router):
    """SMoE-Dropout: a frozen random router whose k grows linearly from ``k_start`` to ``top_k`` over ``ramp_steps``.

    The gate is a buffer (never trained); call ``set_step(step)`` from the training loop. Selection is
    softmax → top-k with renormalised weights.
    """

    def __init__(
        self, hidden: int, num_experts: int, top_k: int, *, k_start: int = 1, ramp_steps: int = 1000, **kw
    ) -> None:
        super().__init__(hidden, num_experts, top_k, **kw)
        gate = self.weight.detach().clone()
        del self.weight
        self.register_buffer("weight", gate)
        self.k_start, self.k_end, self.ramp_steps = max(1, k_start), top_k, max(1, ramp_steps)
        self.current_k = self.k_start

    def set_step(self, step: int) -> int:
        """Set the training step; returns the number of active experts it implies."""
        frac = min(1.0, max(0, step) / self.ramp_steps)
        self.current_k = min(self.k_end, self.k_start + math.floor(frac * (self.k_end - self.k_start) + 1e-9))
        return self.current_k

    def select(self, logits: torch.Tensor):
        probs = expert_scores(logits, "softmax")
        weights, ids = probs.topk(self.current_k, dim=-1)
        weights = renormalize(weights)
        return weights, ids, probs, ids, self.num_experts


def build_router(name: str, hidden: int, num_experts: int, top_k: int, **kwargs) -> Router:
    """Instantiate the router registered as ``name`` (one-line MoekitError listing choices if unknown)."""
    return ROUTERS.get(name)(hidden, num_experts, top_k, **kwargs)


@torch.no_grad()
def update_router_biases(model: nn.Module, u: float | None = None) -> int:
    """Apply the aux-loss-free bias step to every ``SigmoidBiasRouter`` without ``auto_update``; returns how many."""
    n = 0
    for module in model.modules():
        if isinstance(module, SigmoidBiasRouter) and not module.auto_update:
            module.update_bias(None, u)
            n += 1
    return n
