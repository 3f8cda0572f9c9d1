"""RoutingControl: how routing should be changed (disable / force / scale / bias / top-k / top-p)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from moekit.errors import MoekitError
from moekit.experts import ExpertRef, ExpertSet
from moekit.models.moe_map import MoELayerView, MoEMap, require_rule
from moekit.validate import finite_float, integer

Expert = ExpertRef  # (decoder layer index, expert index); any form ``ExpertRef.coerce`` reads is accepted

MAX_ROUTING_VALUE = 1e4
"""Largest routing-weight factor and |logit bias| accepted: beyond it half precision overflows, and a
bias of 10^4 already decides the selection as surely as forcing the expert."""


@dataclass(frozen=True)
class RoutingControl:
    """One set of routing changes. Several controls compose (see ``merge``)."""

    disable: frozenset[Expert] = frozenset()
    force: frozenset[Expert] = frozenset()
    scale: Mapping[Expert, float] = field(default_factory=dict)
    bias: Mapping[Expert, float] = field(default_factory=dict)
    top_k: int | Mapping[int, int] | None = None
    top_p: float | Mapping[int, float] | None = None

    @classmethod
    def make(cls, disable: Iterable[Expert] = (), force: Iterable[Expert] = (), scale=None, bias=None,
             top_k=None, top_p=None) -> RoutingControl:
        """A control from experts in any form ``ExpertRef.coerce`` reads (refs, "3:5", (3, 5) pairs)."""
        return cls(frozenset(ExpertSet(disable)), frozenset(ExpertSet(force)), _keyed(scale), _keyed(bias),
                   top_k, top_p)

    def is_empty(self) -> bool:
        return not (self.disable or self.force or self.scale or self.bias) and self.top_k is None \
            and self.top_p is None

    def experts(self) -> set[Expert]:
        return set(self.disable) | set(self.force) | set(self.scale) | set(self.bias)

    def validate(self, moe: MoEMap) -> None:
        """One-line errors for experts or layers that do not exist and impossible requests (NaN, ±inf,
        negative or huge factors and biases included: they would make NaN logits, not an error)."""
        ExpertSet(self.experts()).check(moe)
        for (layer, expert), v in self.scale.items():
            finite_float(f"the routing-weight factor of expert {layer}:{expert}", _number(v), 0.0, MAX_ROUTING_VALUE)
        for (layer, expert), v in self.bias.items():
            finite_float(f"the logit bias of expert {layer}:{expert}", _number(v), -MAX_ROUTING_VALUE,
                         MAX_ROUTING_VALUE)
        for name, value, lo, hi in (("top_k", self.top_k, 1, None), ("top_p", self.top_p, 0.0, 1.0)):
            values = value.items() if isinstance(value, Mapping) else [(None, value)]
            for layer, v in values:
                if v is None:
                    continue
                if name == "top_k":
                    integer("top_k", v)
                else:
                    finite_float("top_p", v)
                if layer is not None:
                    moe.layer(layer)
                E = moe.layer(layer).num_experts if layer is not None else min(vw.num_experts for vw in moe)
                bad = v < lo or (hi is not None and v > hi) or (name == "top_p" and v <= 0)
                if name == "top_k" and v > E:
                    raise MoekitError(f"top_k={v} exceeds the number of experts ({E})")
                if bad:
                    raise MoekitError(f"{name}={v} is out of range" + (" (0 < p <= 1)" if name == "top_p" else ""))
        for view in moe:
            forced = sum(1 for (li, _) in self.force if li == view.index)
            k = _per_layer(self.top_k, view.index) or view.top_k
            if forced > k:
                raise MoekitError(f"{forced} experts forced in layer {view.index} but only {k} are selected per token")
            if not self.is_empty():
                require_rule(view)


def _keyed(values: Mapping | None) -> dict[ExpertRef, object]:
    """``values`` keyed by ExpertRef (keys in any form ``ExpertRef.coerce`` reads)."""
    return {ExpertRef.coerce(k): v for k, v in (values or {}).items()}


def _number(v):
    """A one-element tensor (test-time rerouting keeps its biases as tensors with gradients) as a float."""
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return float(v.detach())
    return v


def _per_layer(value, layer: int):
    if isinstance(value, Mapping):
        return value.get(layer)
    return value


def merge(controls: Iterable[RoutingControl]) -> RoutingControl:
    """Compose controls: disable/force union, scales multiply, biases add, the innermost k / p wins."""
    disable, force, scale, bias = set(), set(), {}, {}
    top_k = top_p = None
    for c in controls:
        disable |= c.disable
        force |= c.force
        for key, v in c.scale.items():
            scale[key] = scale.get(key, 1.0) * v
        for key, v in c.bias.items():
            bias[key] = bias.get(key, 0.0) + v
        top_k = c.top_k if c.top_k is not None else top_k
        top_p = c.top_p if c.top_p is not None else top_p
    return RoutingControl.make(disable, force, scale, bias, top_k, top_p)


@dataclass
class LayerControl:
    """A control resolved to tensors for one MoE layer (what the router hook applies)."""

    disable: torch.Tensor | None
    force: torch.Tensor | None
    logit_bias: torch.Tensor | None
    scale: torch.Tensor | None
    top_k: int | None
    top_p: float | None

    @classmethod
    def resolve(cls, control: RoutingControl, view: MoELayerView, device) -> LayerControl | None:
        E, li = view.num_experts, view.index

        def mask(items):
            es = [e for (layer, e) in items if layer == li]
            if not es:
                return None
            m = torch.zeros(E, dtype=torch.bool, device=device)
            m[es] = True
            return m

        def vec(items, fill):
            es = {e: v for (layer, e), v in items.items() if layer == li}
            if not es:
                return None
            t = torch.full((E,), fill, dtype=torch.float32, device=device)
            for e, v in es.items():
                t[e] = v
            return t

        out = cls(mask(control.disable), mask(control.force), vec(control.bias, 0.0), vec(control.scale, 1.0),
                  _per_layer(control.top_k, li), _per_layer(control.top_p, li))
        empty = all(getattr(out, f) is None for f in ("disable", "force", "logit_bias", "scale", "top_k", "top_p"))
        return None if empty else out
