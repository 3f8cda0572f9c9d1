"""MoEMap: one view of every MoE layer of a transformers model, whatever its architecture.

For each supported architecture an ``ArchSpec`` says where the MoE block, router, expert bank and
shared experts live and which selection rule the router implements. Models that follow the v5
router/experts convention but are not listed go through a generic path that *verifies* the rule by
running the router against each known rule; if none matches, routing control is refused rather than
guessed (recording still works, since it reads the router's real output).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from moekit.errors import NotAnMoEModel, UnsupportedArchitecture
from moekit.models.rules import (
    Rule,
    SigmoidGroup,
    SoftmaxGroupMax,
    SoftmaxTopK,
    SparseMixer,
    TopKSoftmax,
)
from moekit.registry import Registry


@dataclass(frozen=True)
class ArchSpec:
    """Where an architecture keeps its MoE parts, and its selection rule."""

    model_type: str
    block_attr: str                      # attribute of the decoder layer holding the MoE block
    router_attr: str                     # attribute of the block holding the router
    shared_attrs: tuple[str, ...] = ()   # always-on shared experts (and their gate)
    make_rule: Callable[[nn.Module, object], Rule] = SoftmaxTopK
    expert_layout: str = "fused"         # "fused": gate_up [E,2I,H], down [E,H,I]; "gpt_oss": transposed+interleaved


ARCHITECTURES: Registry[ArchSpec] = Registry("architecture")


def _register(spec: ArchSpec) -> None:
    ARCHITECTURES.register(spec.model_type)(spec)


def _deepseek_v2_rule(router: nn.Module, config) -> Rule:
    scale = float(getattr(router, "routed_scaling_factor", 1.0))
    if getattr(router, "topk_method", "greedy") == "group_limited_greedy":
        return SoftmaxGroupMax(router, config, renormalize=False, scaling=scale)
    return SoftmaxTopK(router, config, renormalize=False, scaling=scale)


_register(ArchSpec("mixtral", "mlp", "gate", make_rule=lambda r, c: SoftmaxTopK(r, c, renormalize=True)))
_register(ArchSpec("qwen2_moe", "mlp", "gate", shared_attrs=("shared_expert", "shared_expert_gate")))
_register(ArchSpec("qwen3_moe", "mlp", "gate"))
_register(ArchSpec("olmoe", "mlp", "gate"))
_register(ArchSpec("deepseek_v2", "mlp", "gate", shared_attrs=("shared_experts",), make_rule=_deepseek_v2_rule))
_register(ArchSpec("deepseek_v3", "mlp", "gate", shared_attrs=("shared_experts",), make_rule=SigmoidGroup))
# GLM-4.5/4.6 and dots.llm1 use DeepSeek-V3's MoE block (sigmoid router with selection bias and group limit)
_register(ArchSpec("glm4_moe", "mlp", "gate", shared_attrs=("shared_experts",), make_rule=SigmoidGroup))
_register(ArchSpec("dots1", "mlp", "gate", shared_attrs=("shared_experts",), make_rule=SigmoidGroup))
_register(ArchSpec("gpt_oss", "mlp", "router", make_rule=TopKSoftmax, expert_layout="gpt_oss"))
_register(ArchSpec("granitemoe", "block_sparse_moe", "router", make_rule=TopKSoftmax))
_register(ArchSpec("phimoe", "mlp", "router", make_rule=SparseMixer))


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
    _controlled: bool = field(default=False, repr=False)

    @property
    def num_experts(self) -> int:
        return int(self.experts.num_experts)

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
        return int(self.router.weight.shape[1])

    @property
    def intermediate_size(self) -> int:
        return int(self.experts.down_proj.shape[1 if self.expert_layout == "gpt_oss" else 2])

    @property
    def has_bias(self) -> bool:
        return bool(getattr(self.experts, "has_bias", False))

    def expert_weights(self, e: int) -> dict[str, torch.Tensor]:
        """Views (no copy) of expert ``e``'s weights in ``nn.Linear`` (out, in) convention:
        ``gate`` [I,H], ``up`` [I,H], ``down`` [H,I], plus ``*_bias`` where the architecture has them."""
        if not 0 <= e < self.num_experts:
            raise IndexError(f"expert {e} out of range for layer {self.index} ({self.num_experts} experts)")
        ex = self.experts
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
        return sum(t.numel() for t in self.expert_weights(0).values())


@dataclass
class MoEMap:
    """All MoE layers of a model, in decoder order."""

    model_type: str
    layers: list[MoELayerView]
    num_decoder_layers: int
    generic: bool = False

    def __iter__(self) -> Iterator[MoELayerView]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def indices(self) -> list[int]:
        return [layer.index for layer in self.layers]

    def layer(self, index: int) -> MoELayerView:
        """The view of decoder layer ``index``; a clear error when that layer is not an MoE layer."""
        for view in self.layers:
            if view.index == index:
                return view
        from moekit.errors import MoekitError

        raise MoekitError(f"layer {index} is not an MoE layer (MoE layers: {self.indices})")

    def check_expert(self, layer: int, expert: int) -> None:
        """Raise a one-line error if (layer, expert) does not exist in this model."""
        from moekit.errors import MoekitError

        view = self.layer(layer)
        if not 0 <= expert < view.num_experts:
            raise MoekitError(f"expert {expert} out of range for layer {layer} (0..{view.num_experts - 1})")

    def param_counts(self, model: nn.Module) -> dict[str, int]:
        """Total and active (per token) parameters; shared experts count as active."""
        total = sum(p.numel() for p in model.parameters())
        routed = sum(view.num_experts * view.expert_param_count() for view in self.layers)
        active_routed = sum(view.top_k * view.expert_param_count() for view in self.layers)
        return {"total": total, "routed_experts": routed, "active": total - routed + active_routed}


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The decoder layer list of a causal LM (``model.model.layers`` in every HF decoder)."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) else None


def _is_expert_bank(m: nn.Module | None) -> bool:
    return m is not None and hasattr(m, "num_experts") and isinstance(getattr(m, "down_proj", None), torch.Tensor) \
        and m.down_proj.dim() == 3


def build_moe_map(model: nn.Module) -> MoEMap:
    """Map every MoE layer of ``model``; raises NotAnMoEModel / UnsupportedArchitecture."""
    config = model.config
    model_type = getattr(config, "model_type", type(model).__name__)
    layers = decoder_layers(model)
    supported = ", ".join(ARCHITECTURES.names())
    if layers is None:
        raise NotAnMoEModel(f"{model_type} has no decoder layer list moekit can read; supported: {supported}")
    spec = ARCHITECTURES._items.get(model_type)
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
    return MoEMap(model_type=model_type, layers=views, num_decoder_layers=len(layers), generic=spec is None)


def _view_from_spec(i: int, layer: nn.Module, spec: ArchSpec, config) -> MoELayerView | None:
    block = getattr(layer, spec.block_attr, None)
    experts = getattr(block, "experts", None)
    router = getattr(block, spec.router_attr, None)
    if not _is_expert_bank(experts) or router is None:
        return None  # a dense layer (DeepSeek first_k_dense_replace, Qwen mlp_only_layers)
    shared = {a: getattr(block, a) for a in spec.shared_attrs if getattr(block, a, None) is not None}
    return MoELayerView(i, block, router, experts, shared, spec.make_rule(router, config), spec.expert_layout)


def _sigmoid_group_candidate(router: nn.Module, config) -> Rule | None:
    """DeepSeek-V3's rule, for routers that carry its selection bias and group attributes."""
    needed = ("e_score_correction_bias", "num_group", "topk_group", "norm_topk_prob", "routed_scaling_factor")
    return SigmoidGroup(router, config) if all(hasattr(router, a) for a in needed) else None


_CANDIDATE_RULES = (
    lambda r, c: SoftmaxTopK(r, c, renormalize=True),
    lambda r, c: SoftmaxTopK(r, c, renormalize=False),
    TopKSoftmax,
    _sigmoid_group_candidate,
)


def _generic_view(i: int, layer: nn.Module, config) -> MoELayerView | None:
    """A layer of an unlisted architecture that follows the v5 router/experts convention."""
    for block in layer.children():
        experts = getattr(block, "experts", None)
        if not _is_expert_bank(experts):
            continue
        router = next((getattr(block, a) for a in ("gate", "router") if hasattr(block, a)), None)
        if router is None or not isinstance(getattr(router, "weight", None), torch.Tensor):
            continue
        layout = "gpt_oss" if getattr(experts, "is_transposed", False) else "fused"
        shared = {n: m for n, m in block.named_children() if "shared" in n}
        return MoELayerView(i, block, router, experts, shared, _verified_rule(router, config), layout)
    return None


@torch.no_grad()
def _verified_rule(router: nn.Module, config) -> Rule | None:
    """The known rule whose output equals the router's own on random inputs, or None."""
    if not hasattr(router, "top_k") and not hasattr(config, "num_experts_per_tok"):
        return None
    H = router.weight.shape[1]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, H, generator=gen).to(router.weight.dtype)
    try:
        out = router(x)
    except Exception:
        return None
    if not (isinstance(out, tuple) and len(out) == 3):
        return None
    logits, w, ids = out
    for make in _CANDIDATE_RULES:
        rule = make(router, config)
        if rule is None:
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
