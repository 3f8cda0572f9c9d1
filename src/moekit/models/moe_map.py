"""MoEMap: one view of every MoE layer of a transformers model, whatever its architecture.

For each supported architecture an ``ArchSpec`` (``architectures.py``) says where the MoE block, router,
expert bank and shared experts live and which selection rule the router implements. Models that follow the
v5 router/experts convention but are not listed go through a generic path that *verifies* the rule by
running the router against each known rule; if none matches, routing control is refused rather than
guessed (recording still works, since it reads the router's real output).

The map is also the one place that converts between HF decoder-layer indices (what ``moekit.experts``
refs, files and options use) and positions among the MoE layers (``moe_position`` / ``layer_of``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from moekit.errors import MoekitError, NotAnMoEModel, UnsupportedArchitecture
from moekit.experts import ExpertRef, ExpertSet, moe_position
from moekit.models.architectures import ARCHITECTURES, ArchSpec
from moekit.models.rules import Rule, ScoredTopK, SigmoidGroup, SoftmaxTopK, TopKSoftmax


@dataclass
class MoELayerView:
    """One MoE layer: the real submodules of the HF model plus what moekit knows about them."""

    index: int                      # decoder layer index in the HF model
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    shared: dict[str, nn.Module]
    rule: Rule | None               # None: layout understood, rule unknown (no routing control)
    expert_layout: str = "fused"
    logit_weight: torch.Tensor | None = None  # the weight computing the router logits (default: router.weight)
    router_io: str = "triple"
    zero_experts: int = 0           # identity experts at the end of the id range (LongCat-Flash)
    _controlled: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.logit_weight is None:
            self.logit_weight = self.router.weight

    @property
    def num_experts(self) -> int:
        """Routing choices per token (rows of the router), zero-computation experts included."""
        return int(self.logit_weight.shape[0])

    def bank_problem(self, dispatch: bool = True) -> str | None:
        """None when the experts are a fused bank (sliced by the pruned-checkpoint writer) that, with
        ``dispatch``, runs through transformers' experts implementation (what the offload engine serves);
        else why not."""
        if self.expert_layout == "none":
            return f"{type(self.experts).__name__} keeps its experts as 2-D matrices, not a fused bank"
        if self.zero_experts:
            return "zero-computation experts sit beside the weight bank"
        if self.expert_layout == "jetmoe":
            return "JetMoE's MLP and attention experts share one expert count in the config (pruning one would " \
                   "break the other) and run their own sorted dispatch"
        if dispatch and self.router_io == "dense_scores":
            return f"{type(self.experts).__name__} runs every expert densely on score-scaled inputs"
        return None

    def require_standard_bank(self, what: str, dispatch: bool = True) -> None:
        """A clean UnsupportedArchitecture for ``what`` (e.g. "offloading") on a non-standard expert bank."""
        reason = self.bank_problem(dispatch)
        if reason is not None:
            raise UnsupportedArchitecture(f"{what} is not supported for this architecture yet: {reason}")

    @property
    def hook_target(self) -> tuple[nn.Module, str]:
        """The module and method whose output carries the routing decision (what ``RouterHook`` wraps)."""
        return (self.block, "route_tokens_to_experts") if self.router_io == "logits" else (self.router, "forward")

    @property
    def top_k(self) -> int:
        return int(self.rule.top_k if self.rule is not None else self.router.top_k)

    @property
    def renormalize(self) -> bool | None:
        return None if self.rule is None else self.rule.renormalize

    @property
    def rule_name(self) -> str:
        return "unknown" if self.rule is None else self.rule.describe()

    @property
    def hidden_size(self) -> int:
        return int(self.logit_weight.shape[1])

    @property
    def intermediate_size(self) -> int:
        if self.expert_layout == "none":
            return int(self.experts.ffn_hidden_size)
        if self.expert_layout == "jetmoe":
            return int(self.experts.output_linear.weight.shape[2])
        return int(self.experts.down_proj.shape[1 if self.expert_layout in ("gpt_oss", "transposed") else 2])

    @property
    def has_bias(self) -> bool:
        return bool(getattr(self.experts, "has_bias", False))

    def expert_weights(self, e: int) -> dict[str, torch.Tensor]:
        """Views (no copy) of expert ``e``'s weights in ``nn.Linear`` (out, in) convention:
        ``gate`` [I,H], ``up`` [I,H], ``down`` [H,I], plus ``*_bias`` where the architecture has them."""
        if not 0 <= e < self.num_experts - self.zero_experts:
            raise IndexError(f"expert {e} out of range for layer {self.index} "
                             f"({self.num_experts - self.zero_experts} experts with weights)")
        ex = self.experts
        if self.expert_layout == "none":
            raise UnsupportedArchitecture(f"{type(ex).__name__} keeps its experts in a layout without per-expert views")
        if self.expert_layout == "jetmoe":  # input_linear [E, 2I, H] (gate, up), output_linear [E, H, I]
            gu = ex.input_linear.weight[e]
            width = gu.shape[0] // 2
            return {"gate": gu[:width], "up": gu[width:], "down": ex.output_linear.weight[e]}
        if self.expert_layout == "transposed":
            gu = ex.gate_up_proj[e]  # [H, 2I], gate then up along the last axis
            width = gu.shape[1] // 2
            return {"gate": gu[:, :width].T, "up": gu[:, width:].T, "down": ex.down_proj[e].T}
        if self.expert_layout == "gpt_oss":
            gu = ex.gate_up_proj[e]  # [H, 2I], gate/up interleaved along the last axis
            out = {"gate": gu[:, 0::2].T, "up": gu[:, 1::2].T, "down": ex.down_proj[e].T}
            if self.has_bias:
                b = ex.gate_up_proj_bias[e]
                out.update(gate_bias=b[0::2], up_bias=b[1::2], down_bias=ex.down_proj_bias[e])
            return out
        width = self.intermediate_size
        gu = ex.gate_up_proj[e]  # [2I, H]
        return {"gate": gu[:width], "up": gu[width:], "down": ex.down_proj[e]}

    def expert_param_count(self) -> int:
        """Parameters of one routed expert."""
        if self.expert_layout == "none":
            return 3 * self.hidden_size * self.intermediate_size
        return sum(t.numel() for t in self.expert_weights(0).values())


@dataclass
class MoEMap:
    """All MoE layers of a model, in decoder order."""

    model_type: str
    layers: list[MoELayerView]
    num_decoder_layers: int
    generic: bool = False
    attention_experts: list[MoELayerView] = field(default_factory=list)  # mapped, not routed (JetMoE MoA)

    def __iter__(self) -> Iterator[MoELayerView]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def indices(self) -> list[int]:
        return [layer.index for layer in self.layers]

    def layer(self, index: int) -> MoELayerView:
        """The view of decoder layer ``index``; a clear error when that layer is not an MoE layer."""
        return self.layers[self.moe_position(index)]

    # The only conversion between HF decoder-layer indices (what ExpertRef, files and options use) and
    # positions among the MoE layers (axis 0 of traces and per-layer statistics arrays).
    def moe_position(self, layer: int) -> int:
        """Position of decoder layer ``layer`` among the MoE layers; one-line error if it is not one."""
        return moe_position(self.indices, layer)

    def layer_of(self, position: int) -> int:
        """Decoder-layer index of the MoE layer at ``position`` (inverse of ``moe_position``)."""
        if not 0 <= position < len(self.layers):
            raise MoekitError(f"MoE position {position} out of range (this model has {len(self.layers)} MoE layers)")
        return self.layers[position].index

    def ref(self, position: int, expert: int) -> ExpertRef:
        """The ExpertRef of ``expert`` in the MoE layer at ``position`` (for arrays indexed by MoE position)."""
        return ExpertRef(self.layer_of(position), expert)

    def check_expert(self, layer: int, expert: int) -> None:
        """Raise a one-line error if (layer, expert) does not exist in this model."""
        view = self.layer(layer)
        if not 0 <= expert < view.num_experts:
            raise MoekitError(f"expert {expert} out of range for layer {layer} (0..{view.num_experts - 1})")

    def all_experts(self) -> ExpertSet:
        """Every routed expert of the model."""
        return ExpertSet(ExpertRef(v.index, e) for v in self.layers for e in range(v.num_experts))

    def param_counts(self, model: nn.Module) -> dict[str, int]:
        """Total and active (per token) parameters; shared experts count as active."""
        total = sum(p.numel() for p in model.parameters())
        routed = sum((view.num_experts - view.zero_experts) * view.expert_param_count() for view in self.layers)
        active_routed = sum(view.top_k * view.expert_param_count() for view in self.layers)
        return {"total": total, "routed_experts": routed, "active": total - routed + active_routed}


def decoder_layers(model: nn.Module, path: str = "model.layers") -> nn.ModuleList | None:
    """The decoder layer list of a causal LM (``model.model.layers`` in almost every HF decoder; a text
    model without an LM head has its ``layers`` at the top)."""
    for candidate in (path, path.split(".", 1)[-1]):
        layers = model
        for part in candidate.split("."):
            layers = getattr(layers, part, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    return None


def _is_expert_bank(m: nn.Module | None) -> bool:
    return m is not None and isinstance(getattr(m, "down_proj", None), torch.Tensor) and m.down_proj.dim() == 3


def build_moe_map(model: nn.Module) -> MoEMap:
    """Map every MoE layer of ``model``; raises NotAnMoEModel / UnsupportedArchitecture."""
    config = model.config
    model_type = getattr(config, "model_type", type(model).__name__)
    spec = ARCHITECTURES.get(model_type) if model_type in ARCHITECTURES else None
    layers = decoder_layers(model, spec.layers_path if spec else "model.layers")
    supported = ", ".join(ARCHITECTURES.names())
    if layers is None:
        raise NotAnMoEModel(f"{model_type} has no decoder layer list moekit can read; supported: {supported}")
    views = []
    for i, layer in enumerate(layers):
        view = _view_from_spec(i, layer, spec, config) if spec else _generic_view(i, layer, config)
        if view is not None:
            views.append(view)
    if not views:
        legacy = _legacy_moe_name(layers)
        if legacy:
            raise UnsupportedArchitecture(
                f"{model_type} has MoE layers ({legacy}) in a layout moekit does not support yet; supported: {supported}"
            )
        raise NotAnMoEModel(f"{model_type} has no Mixture-of-Experts layers; supported architectures: {supported}")
    attention = []
    if spec is not None and spec.attention_experts:
        for i, layer in enumerate(layers):
            moa = _attr_path(layer, spec.attention_experts)
            if moa is not None:
                attention.append(MoELayerView(i, moa, moa.router, moa, {}, spec.make_rule(moa.router, config),
                                              "jetmoe", logit_weight=moa.router.layer.weight, router_io="jetmoe"))
    return MoEMap(model_type=model_type, layers=views, num_decoder_layers=len(layers), generic=spec is None,
                  attention_experts=attention)


def _attr_path(obj, path: str):
    """``obj.a.b`` for ``path`` "a.b" (None where a part is missing)."""
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj


def _view_from_spec(i: int, layer: nn.Module, spec: ArchSpec, config) -> MoELayerView | None:
    block = _attr_path(layer, spec.block_attr) if spec.block_attr else layer
    experts = _attr_path(block, spec.experts_attr) if spec.experts_attr else block
    router = getattr(block, spec.router_attr, None)
    weight = _attr_path(router, spec.router_weight)
    if experts is None or not isinstance(weight, torch.Tensor):
        return None  # a dense layer (DeepSeek first_k_dense_replace, Qwen mlp_only_layers)
    if spec.expert_layout not in ("none", "jetmoe") and not _is_expert_bank(experts):
        return None
    # shared modules: names in the block, or dotted paths from the decoder layer
    shared = {a: _attr_path(layer if "." in a else block, a) for a in spec.shared_attrs}
    shared = {a: m for a, m in shared.items() if m is not None}
    rule = spec.make_rule(router, config, block) if spec.rule_needs_block else spec.make_rule(router, config)
    return MoELayerView(i, block, router, experts, shared, rule, spec.expert_layout, logit_weight=weight,
                        router_io=spec.router_io, zero_experts=spec.zero_experts(config) if spec.zero_experts else 0)


def _sigmoid_group_candidate(router: nn.Module, config) -> Rule | None:
    """DeepSeek-V3's rule, for routers that carry its selection bias and group attributes."""
    needed = ("e_score_correction_bias", "num_group", "topk_group", "norm_topk_prob", "routed_scaling_factor")
    return SigmoidGroup(router, config) if all(hasattr(router, a) for a in needed) else None


def _scored_candidates(router: nn.Module, config) -> list[Rule]:
    """ScoredTopK variants from the router's own attributes: softmax or sigmoid, its selection bias (if it has
    one), its group limit, with and without renormalisation, with and without its scaling factor."""
    bias = getattr(router, "e_score_correction_bias", None)
    bias = bias if isinstance(bias, torch.Tensor) else None
    scale = next((float(v) for a in ("routed_scaling_factor", "router_scaling_factor", "route_scale")
                  if isinstance(v := getattr(router, a, None), (int, float))), 1.0)
    n_group = int(getattr(router, "num_group", None) or getattr(router, "n_group", None) or 1)
    topk_group = int(getattr(router, "topk_group", None) or 1)
    out = []
    for score in ("sigmoid", "softmax"):
        for renorm in (True, False):
            for s in sorted({scale, 1.0}):
                out.append(ScoredTopK(router, config, score=score, bias=bias, renormalize=renorm, scaling=s,
                                      n_group=n_group, topk_group=topk_group))
    return out


_CANDIDATE_RULES = (
    lambda r, c: SoftmaxTopK(r, c, renormalize=True),
    lambda r, c: SoftmaxTopK(r, c, renormalize=False),
    TopKSoftmax,
    _sigmoid_group_candidate,
    _scored_candidates,
)


def _generic_view(i: int, layer: nn.Module, config) -> MoELayerView | None:
    """A layer of an unlisted architecture that follows the v5 router/experts convention."""
    for block in layer.children():
        experts = getattr(block, "experts", None)
        if not _is_expert_bank(experts):
            continue
        router = next((getattr(block, a) for a in ("gate", "router") if hasattr(block, a)), None)
        weight = _router_weight(router)
        if weight is None:
            continue
        layout = "gpt_oss" if getattr(experts, "is_transposed", False) else "fused"
        shared = {n: m for n, m in block.named_children() if "shared" in n}
        return MoELayerView(i, block, router, experts, shared, _verified_rule(router, config, weight), layout,
                            logit_weight=weight)
    return None


def _router_weight(router: nn.Module | None) -> torch.Tensor | None:
    """The [E, H] weight a router computes its logits with (its own, or that of its one linear layer)."""
    for path in ("weight", "gate.weight", "wg.weight", "classifier.weight", "layer.weight", "linear.weight"):
        w = _attr_path(router, path) if router is not None else None
        if isinstance(w, torch.Tensor) and w.dim() == 2:
            return w
    return None


@torch.no_grad()
def _verified_rule(router: nn.Module, config, weight: torch.Tensor) -> Rule | None:
    """The known rule whose output equals the router's own on random inputs, or None."""
    if not hasattr(router, "top_k") and not hasattr(config, "num_experts_per_tok"):
        return None
    H = weight.shape[1]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, H, generator=gen).to(weight.dtype)
    try:
        out = router(x)
    except Exception:
        return None
    if not (isinstance(out, tuple) and len(out) == 3):
        return None
    logits, w, ids = out
    candidates = []
    for make in _CANDIDATE_RULES:
        made = make(router, config)
        candidates += made if isinstance(made, list) else [made]
    for rule in candidates:
        if rule is None or rule.top_k < 1:
            continue
        sel = rule.select(logits)
        if sel.ids.shape == ids.shape and torch.equal(sel.ids.sort(-1)[0], ids.sort(-1)[0]) and torch.allclose(
            sel.weights.gather(1, sel.ids.argsort(-1)), w.float().gather(1, ids.argsort(-1)), atol=1e-5
        ):
            return rule
    return None


def _legacy_moe_name(layers: nn.ModuleList) -> str | None:
    """Name of an MoE-looking submodule that is not in the v5 layout (for a clear error)."""
    for layer in layers:
        for name, m in layer.named_modules():
            if isinstance(m, nn.ModuleList) and len(m) > 1 and ("expert" in name):
                return name
            if "moe" in type(m).__name__.lower():
                return type(m).__name__
    return None


def require_rule(view: MoELayerView) -> Rule:
    """The layer's selection rule, or a clear error for generic layers whose rule is unknown."""
    if view.rule is None:
        raise UnsupportedArchitecture(
            f"layer {view.index}: moekit can record this router but does not know its selection rule, "
            "so it cannot change routing here yet"
        )
    return view.rule
