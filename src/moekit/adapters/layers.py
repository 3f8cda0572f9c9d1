"""PEFT LoRA layers for the adapter-expert methods (registered through PEFT's custom-module mechanism).

Each class subclasses PEFT's ``lora.Linear`` so PEFT's machinery (adapter names, several adapters,
``save_pretrained`` / ``PeftModel.from_pretrained``, ``disable_adapter``, delete) works unchanged. Extra
state lives in ``ModuleDict``s keyed by adapter name: trainable routers in ``lora_router`` (listed in
``adapter_layer_names``), the sign-rule bias in ``lora_route_bias`` as a buffer (saved, never trained).
Settings come from ``config.moekit`` (see ``moekit.adapters.methods``).
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from moekit.errors import MoekitError


class FrozenWeight(nn.Module):
    """A fixed matrix kept as a (saved) buffer named ``weight``: it has no parameter, so nothing trains it."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)


class RouteBias(nn.Module):
    """A per-expert selection bias moved by the sign rule; a buffer, so gradients never touch it."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("value", torch.zeros(n))


def layer_seed(seed: int, target_name: str) -> int:
    """A stable per-layer seed (Python's ``hash`` is salted per process, crc32 is not)."""
    return (int(seed) * 1_000_003 + zlib.crc32(target_name.encode())) % (2**31)


def sign_rule_(bias: torch.Tensor, idx: torch.Tensor, n: int, rate: float) -> None:
    """Aux-loss-free balancing: ``b_i += rate * sign(mean(c) - c_i)`` with c the selection counts."""
    if rate == 0:
        return
    counts = torch.bincount(idx.reshape(-1), minlength=n).to(bias.dtype)
    bias.add_(rate * torch.sign(counts.mean() - counts))


class _MoekitLoraLinear(LoraLinear):
    """Shared plumbing: settings per adapter, a forward summing every active adapter's update, load counts."""

    adapter_layer_names = LoraLinear.adapter_layer_names + ("lora_router",)
    other_param_names = LoraLinear.other_param_names + ("lora_route_bias",)
    method = "?"

    def _init_extra(self) -> None:
        if "lora_router" not in self._modules:
            self.lora_router = nn.ModuleDict({})
            self.lora_route_bias = nn.ModuleDict({})
            self.moe_settings: dict[str, dict[str, Any]] = {}
            self.moe_load: dict[str, torch.Tensor] = {}
            self.moe_aux: dict[str, torch.Tensor] = {}

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs) -> None:
        self._init_extra()
        settings = dict(config.moekit or {})
        self.moe_settings[adapter_name] = settings
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        self._init_method(adapter_name, r, settings, kwargs.get("target_name", ""))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _init_method(self, adapter_name: str, r: int, settings: dict, target_name: str) -> None:
        raise NotImplementedError

    def _count(self, adapter: str, idx: torch.Tensor, n: int) -> None:
        counts = torch.bincount(idx.reshape(-1).detach(), minlength=n).cpu()
        prev = self.moe_load.get(adapter)
        self.moe_load[adapter] = counts if prev is None else prev + counts

    def _delta(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            dtype = self.lora_B[adapter].weight.dtype
            result = result + self._delta(adapter, self.lora_dropout[adapter](x.to(dtype))).to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise MoekitError(f"a {self.method} adapter's update depends on each token's routing; it cannot be merged "
                          "into the base weights (only plain LoRA can)")

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        raise MoekitError(f"a {self.method} adapter has no input-independent weight delta")


class FlyLoraLinear(_MoekitLoraLinear):
    """FlyLoRA (Zou et al., "FlyLoRA: Boosting Task Decoupling and Parameter Efficiency via Implicit Rank-Wise
    Mixture-of-Experts", NeurIPS 2025, arXiv 2510.08396; reference code gfyddha/FlyLoRA ``flylora.py``).

    ``A ∈ R^{r×n}`` is frozen and sparse random: each row has ``p = max(1, int(n·k/r))`` non-zeros drawn
    from N(0, 1/r²). ``y = A x``; the implicit router keeps the top-k ranks of ``|y + d|``; the output is
    ``B (y ⊙ mask) · α/r`` with B zero at init. ``d`` is not trained: in training-mode forwards it moves by
    ``bias_lr · sign(mean(c) − c_i)`` (c = rank selection counts of that forward).

    ``route_bias="outside"`` (a moekit option, not in the paper) selects on ``|y| + d`` instead: with the
    reference's ``|y + d|`` a rank whose d goes negative can be chosen *more* often once ``|d|`` exceeds
    ``|y|``, so the rule does not reliably even the load (docs/adapters.md has the measurement).
    """

    method = "flylora"

    def _init_method(self, adapter_name: str, r: int, settings: dict, target_name: str) -> None:
        k = int(settings["active"])
        n = self.in_features
        gen = torch.Generator().manual_seed(layer_seed(settings.get("seed", 0), target_name))
        p = max(1, int(n * k / r))
        a = torch.zeros(r, n)
        for i in range(r):
            cols = torch.randperm(n, generator=gen)[:p]
            a[i, cols] = torch.randn(p, generator=gen) / r
        self.lora_A[adapter_name] = FrozenWeight(a.to(self.lora_B[adapter_name].weight.dtype))
        nn.init.zeros_(self.lora_B[adapter_name].weight)
        self.lora_route_bias[adapter_name] = RouteBias(r)

    def _delta(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        s = self.moe_settings[adapter]
        r, k = self.r[adapter], int(s["active"])
        y = F.linear(x, self.lora_A[adapter].weight)
        d = self.lora_route_bias[adapter].value
        score = (y.detach() + d).abs() if s.get("route_bias", "inside") == "inside" else y.detach().abs() + d
        idx = score.topk(k, dim=-1).indices
        if self.training:
            sign_rule_(d, idx, r, float(s.get("bias_lr", 1e-3)))
        self._count(adapter, idx, r)
        mask = torch.zeros_like(y).scatter_(-1, idx, 1.0)
        return self.lora_B[adapter](y * mask) * self.scaling[adapter]


class SMoRALinear(_MoekitLoraLinear):
    """SMoRA, every rank an expert (Zhao et al., "Each Rank Could be an Expert: Single-Ranked Mixture of Experts
    LoRA for Multi-Task Learning", arXiv 2501.15103; reference code StyxXuan/smora ``tuners/srmole/layer.py``).

    Router ``W_g ∈ R^{(r/P)×n}`` (no bias), ``s = sigmoid(W_g x)`` repeated P times (``rank_partition``),
    plus the selection bias d: ``l = s + d``; keep the top-``active`` ranks; gates ``g = l_sel / Σ l_sel ·
    active`` (as in the reference code the bias is part of the gate value); output ``B diag(g) A x ·
    α/active``. A Kaiming, B zero. d moves by ``bias_lr · sign(mean(c) − c_i)`` in training forwards
    (reference default 1e-5). ``compute="sparse"`` gathers only the active rows of A and columns of B;
    ``"dense"`` masks the full product; they agree to rounding.
    """

    method = "smora"

    def _init_method(self, adapter_name: str, r: int, settings: dict, target_name: str) -> None:
        part = int(settings.get("rank_partition", 1))
        gen = torch.Generator().manual_seed(layer_seed(settings.get("seed", 0), target_name))
        router = nn.Linear(self.in_features, r // part, bias=False)
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            router.weight.copy_(torch.rand(router.weight.shape, generator=gen) * 2 * bound - bound)
        self.lora_router[adapter_name] = router.to(self.lora_B[adapter_name].weight.dtype)
        self.lora_route_bias[adapter_name] = RouteBias(r)
        self.scaling[adapter_name] = self.lora_alpha[adapter_name] / int(settings["active"])

    def _gates(self, adapter: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.moe_settings[adapter]
        r, k = self.r[adapter], int(s["active"])
        logits = torch.sigmoid(self.lora_router[adapter](x))
        logits = logits.repeat_interleave(int(s.get("rank_partition", 1)), dim=-1)
        d = self.lora_route_bias[adapter].value
        top, idx = (logits + d).topk(k, dim=-1)
        if self.training:
            with torch.no_grad():
                sign_rule_(d, idx, r, float(s.get("bias_lr", 1e-5)))
        self._count(adapter, idx, r)
        return top / top.sum(-1, keepdim=True) * k, idx

    def _delta(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        gates, idx = self._gates(adapter, x)
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        if self.moe_settings[adapter].get("compute", "sparse") == "dense":
            g = torch.zeros(*x.shape[:-1], a.shape[0], dtype=x.dtype, device=x.device).scatter(-1, idx, gates)
            out = F.linear(F.linear(x, a) * g, b)
        else:
            z = torch.einsum("...i,...ki->...k", x, a[idx])  # only the active rows of A
            out = torch.einsum("...k,...ko->...o", z * gates, b.t()[idx])  # only the active columns of B
        return out * self.scaling[adapter]


class MoRALinear(_MoekitLoraLinear):
    """MoRA, self-activated rank-1 experts ("Little By Little: Continual Learning via Self-Activated Sparse
    Mixture-of-Rank Adaptive Learning", 2025; definition from the paper abstract, no public code found).

    The rank-r update is r rank-1 experts ``b_i a_iᵀ``. There is no router: each expert scores its own
    relevance from its intermediate activation ``z_i = a_iᵀ x`` as ``|z_i|``; an activation budget keeps
    the ``active`` most relevant unpruned experts per token; output ``Σ_sel b_i z_i · α/active``. Rank
    pruning (:func:`prune_ranks`) switches experts off for good by importance ``‖a_i‖·‖b_i‖``; the mask is
    the saved buffer ``lora_route_bias`` (0 = kept, −inf = pruned).
    """

    method = "mora"

    def _init_method(self, adapter_name: str, r: int, settings: dict, target_name: str) -> None:
        self.lora_route_bias[adapter_name] = RouteBias(r)
        self.scaling[adapter_name] = self.lora_alpha[adapter_name] / int(settings["active"])

    def _delta(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        r, k = self.r[adapter], int(self.moe_settings[adapter]["active"])
        z = self.lora_A[adapter](x)
        pruned = self.lora_route_bias[adapter].value
        idx = (z.detach().abs() + pruned).topk(min(k, int(torch.isfinite(pruned).sum())), dim=-1).indices
        self._count(adapter, idx, r)
        mask = torch.zeros_like(z).scatter_(-1, idx, 1.0)
        return self.lora_B[adapter](z * mask) * self.scaling[adapter]

    def prune(self, adapter: str, keep: int) -> None:
        """Keep the ``keep`` rank-1 experts of largest ‖a_i‖·‖b_i‖; the others never activate again."""
        imp = self.lora_A[adapter].weight.norm(dim=1) * self.lora_B[adapter].weight.norm(dim=0)
        mask = torch.full_like(imp, float("-inf"))
        mask[imp.topk(keep).indices] = 0.0
        self.lora_route_bias[adapter].value.copy_(mask)


class LoraMoELinear(_MoekitLoraLinear):
    """N LoRA experts behind a learned token router: MixLoRA-style top-k, LoRAMoE (dense), HydraLoRA (shared A).

    Experts are stored stacked: ``lora_A`` rows ``j·r:(j+1)·r`` and ``lora_B`` columns ``j·r:(j+1)·r`` are
    expert j (HydraLoRA: one shared A, only B has N heads). Router ``W_g ∈ R^{N×n}``; ``p = softmax(W_g
    x)``; with ``top_k`` the top-k probabilities are kept and renormalised, otherwise all N are used.
    Output ``Σ_j p_j B_j A_j x · α/r``. In training the layer stores its balance loss in ``moe_aux``.

    - MixLoRA (Li et al., arXiv 2404.15159; TUDB-Labs/MixLoRA): top-k (default 2), Switch-style loss
      ``N Σ_j f_j P_j`` (f_j share of assignments, P_j mean probability), coefficient 0.01. MixLoRA routes
      once per FFN block; here each targeted linear layer has its own router (MoLA-style placement).
    - LoRAMoE (Dou et al., arXiv 2312.09979): dense softmax router; localized balancing: importance
      ``Q_j = Σ_t p_tj`` weighted by ``1+δ`` when the sample's type matches expert j's group and ``1−δ``
      otherwise, loss ``Var(w⊙Q)/Mean(w⊙Q)²``. Half the experts form the world-knowledge group; every
      token counts as task data unless group labels are set with :func:`set_sample_types`.
    - HydraLoRA (Tian et al., NeurIPS 2024, arXiv 2404.19245): shared A, N B heads, dense softmax router.
    """

    method = "lora_moe"

    def _init_method(self, adapter_name: str, r: int, settings: dict, target_name: str) -> None:
        n = int(settings["experts"])
        gen = torch.Generator().manual_seed(layer_seed(settings.get("seed", 0), target_name))
        dtype = self.lora_B[adapter_name].weight.dtype
        rows = r if settings.get("shared_a") else n * r
        a = nn.Linear(self.in_features, rows, bias=False)
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform(a=√5) bound, as PEFT's LoRA A
        with torch.no_grad():
            a.weight.copy_(torch.rand(a.weight.shape, generator=gen) * 2 * bound - bound)
        self.lora_A[adapter_name] = a.to(dtype)
        self.lora_B[adapter_name] = nn.Linear(n * r, self.out_features, bias=False).to(dtype)
        nn.init.zeros_(self.lora_B[adapter_name].weight)
        router = nn.Linear(self.in_features, n, bias=False)
        with torch.no_grad():
            router.weight.normal_(0.0, float(settings.get("router_init", 0.02)), generator=gen)
        self.lora_router[adapter_name] = router.to(dtype)
        self.moe_group_types: torch.Tensor | None = None

    def routing(self, adapter: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(probabilities [..., N], gates [..., N], selected indices or None for a dense router)."""
        s = self.moe_settings[adapter]
        probs = torch.softmax(self.lora_router[adapter](x).float(), dim=-1).to(x.dtype)
        k = int(s.get("top_k") or 0)
        if not k:
            return probs, probs, None
        top, idx = probs.topk(k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
        return probs, gates, idx

    def _delta(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        s = self.moe_settings[adapter]
        n, r = int(s["experts"]), self.r[adapter]
        probs, gates, idx = self.routing(adapter, x)
        self._count(adapter, idx if idx is not None else probs.argmax(-1, keepdim=True), n)
        if self.training:
            self.moe_aux[adapter] = self._balance_loss(s, probs, idx)
        z = self.lora_A[adapter](x)
        if s.get("shared_a"):
            z = z.unsqueeze(-2).expand(*z.shape[:-1], n, r)
        else:
            z = z.unflatten(-1, (n, r))
        z = (z * gates.unsqueeze(-1)).flatten(-2)
        return self.lora_B[adapter](z) * self.scaling[adapter]

    def _balance_loss(self, s: dict, probs: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        n = probs.shape[-1]
        p = probs.reshape(-1, n)
        if s.get("balance") == "localized":
            delta = float(s.get("balance_delta", 0.1))
            types = self.moe_group_types
            if types is None:
                t = torch.ones(p.shape[0], device=p.device)
            else:  # one type per sample (expanded over its tokens) or one per token
                t = types.reshape(-1).to(p)
                t = t.repeat_interleave(p.shape[0] // t.numel()) if t.numel() != p.shape[0] else t
            group = (torch.arange(n, device=p.device) >= n // 2).to(p)  # 0: world-knowledge half, 1: task half
            w = 1 + delta * (2 * (t[:, None] == group[None, :]).to(p) - 1)
            q = (w * p).sum(0)
            return q.var(unbiased=False) / q.mean().pow(2)
        if idx is None:
            return p.new_zeros(())
        f = torch.bincount(idx.reshape(-1), minlength=n).to(p) / idx.numel()
        return n * (f * p.mean(0)).sum()

