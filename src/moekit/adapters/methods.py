"""The registry of adapter methods: name → layer class, defaults, help text (the CLI reads it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moekit.adapters.layers import FlyLoraLinear, LoraMoELinear, MoRALinear, SMoRALinear
from moekit.registry import Registry


@dataclass(frozen=True)
class AdapterMethod:
    """One adapter method: its PEFT layer (None: PEFT's own LoRA), settings it needs, and its defaults."""

    name: str
    help: str
    layer: type | None
    uses_active: bool = False
    uses_experts: bool = False
    mergeable: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)


METHODS: Registry[AdapterMethod] = Registry("adapter method")


def _add(method: AdapterMethod) -> None:
    METHODS.add(method.name, method, help=method.help)


_add(AdapterMethod("lora", "plain LoRA (the control); with --target experts, LoRA on the fused 3-D expert tensors "
                   "(PEFT target_parameters, rank r per expert)", None, mergeable=True))
_add(AdapterMethod("flylora", "FlyLoRA: frozen sparse random A, implicit top-k rank routing on |Ax+d|, B=0, "
                   "sign-rule bias (arXiv 2510.08396)", FlyLoraLinear, uses_active=True,
                   defaults={"bias_lr": 1e-3}))
_add(AdapterMethod("smora", "SMoRA: every rank an expert, sigmoid router + sign-rule bias, top-active ranks, "
                   "renormalised gates (arXiv 2501.15103)", SMoRALinear, uses_active=True,
                   defaults={"bias_lr": 1e-5, "rank_partition": 1, "compute": "sparse"}))
_add(AdapterMethod("mora", "MoRA (Little by Little): rank-1 experts score their own relevance |a_i·x|, "
                   "activation budget, rank pruning", MoRALinear, uses_active=True))
_add(AdapterMethod("mixlora", "MixLoRA-style: N LoRA experts, softmax top-k router, Switch balance loss 0.01 "
                   "(arXiv 2404.15159)", LoraMoELinear, uses_experts=True,
                   defaults={"experts": 4, "top_k": 2, "balance": "switch", "aux_coef": 0.01}))
_add(AdapterMethod("loramoe", "LoRAMoE: N LoRA experts, dense softmax router, localized balancing "
                   "(arXiv 2312.09979)", LoraMoELinear, uses_experts=True,
                   defaults={"experts": 4, "top_k": 0, "balance": "localized", "balance_delta": 0.1,
                             "aux_coef": 0.01}))
_add(AdapterMethod("hydralora", "HydraLoRA: one shared A, N B heads, dense softmax router (arXiv 2404.19245)",
                   LoraMoELinear, uses_experts=True,
                   defaults={"experts": 4, "top_k": 0, "shared_a": True, "balance": "none", "aux_coef": 0.0}))
