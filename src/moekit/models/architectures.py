"""The architecture table: for each supported ``model_type``, where its MoE parts live and its selection rule.

Each ``ArchSpec`` says where the MoE block, router, expert bank and shared experts live and which rule
(``moekit.models.rules``) the router implements, read from the model's modeling file in transformers 5.24.
``moekit.models.moe_map.build_moe_map`` reads this table; unlisted models take its generic, verified path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from moekit.models.rules import (
    Rule,
    ScoredTopK,
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
    make_rule: Callable[..., Rule] = SoftmaxTopK   # (router, config) or, with rule_needs_block, (router, config, block)
    expert_layout: str = "fused"         # "fused": gate_up [E,2I,H], down [E,H,I]; "gpt_oss": transposed+interleaved;
                                         # "transposed": gate_up [E,H,2I] halves, down [E,I,H]; "none": no bank view
    router_weight: str = "weight"        # dotted path (in the router) of the weight that computes the logits
    router_io: str = "triple"            # "triple": router returns (logits, weights, ids); "dense_scores": Llama 4's
                                         # (scores [T,E], logits); "probs": (probabilities, weights, ids) (Gemma 4);
                                         # "jetmoe": JetMoE's sorted dispatch (…, logits);
                                         # "logits": router returns logits and the block's
                                         # ``route_tokens_to_experts`` selects (DBRX)
    rule_needs_block: bool = False
    zero_experts: Callable[[object], int] | None = None  # identity experts after the real ones (LongCat-Flash)
    layers_path: str = "model.layers"    # where the decoder layers live
    experts_attr: str = "experts"        # the expert bank in the block ("" = the block itself, JetMoE)
    attention_experts: str = ""          # dotted path (in the decoder layer) of attention experts (JetMoE MoA)
    note: str = ""                       # what is special about this architecture (support table)


ARCHITECTURES: Registry[ArchSpec] = Registry("architecture")


def _register(spec: ArchSpec) -> None:
    ARCHITECTURES.add(spec.model_type, spec, help=spec.note or f"MoE block at layer.{spec.block_attr}, router .{spec.router_attr}")


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


# --- 2025-26 architectures: each rule read from the model's modeling file in transformers 5.24 ----------
def _block_bias(attr: str):
    return lambda block: getattr(block, attr)


def _minimax_m2_rule(router, config, block) -> Rule:
    # MiniMaxM2TopKRouter: sigmoid; the block's e_score_correction_bias for selection; renorm; no scaling
    return ScoredTopK(router, config, score="sigmoid", bias=block.e_score_correction_bias, renormalize=True)


def _afmoe_rule(router, config, block) -> Rule:
    # AfmoeTokenChoiceRouter: sigmoid; the block's expert_bias for selection; renorm; × route_scale
    return ScoredTopK(router, config, score="sigmoid", bias=block.expert_bias, renormalize=True,
                      scaling=float(router.route_scale))


def _lfm2_moe_rule(router, config, block) -> Rule:
    # Lfm2MoeTopKRouter: sigmoid; expert_bias (if used) for selection; renorm if norm_topk_prob; × scaling
    bias = block.expert_bias if router.use_expert_bias else None
    return ScoredTopK(router, config, score="sigmoid", bias=bias, renormalize=bool(router.norm_topk_prob),
                      scaling=float(router.routed_scaling_factor))


def _ernie_rule(router, config) -> Rule:
    # Ernie4_5_MoeTopKRouter: softmax; moe_statics.e_score_correction_bias for selection; renorm
    return ScoredTopK(router, config, score="softmax", bias=router.moe_statics.e_score_correction_bias,
                      renormalize=True)


def _longcat_rule(router, config) -> Rule:
    # LongcatFlashTopkRouter: softmax over real + zero experts; e_score_correction_bias for selection; × scaling
    return ScoredTopK(router, config, score="softmax", bias=router.e_score_correction_bias, renormalize=False,
                      scaling=float(router.routed_scaling_factor))


def _llama4_rule(router, config) -> Rule:
    # Llama4Router: top-k of the logits, weight sigmoid(logit) (no renorm); the block scales the expert's input
    return ScoredTopK(router, config, score="sigmoid", renormalize=False)


def _dbrx_rule(router, config, block) -> Rule | None:
    # DbrxFFN.route_tokens_to_experts: softmax → top-k → divided by the p-norm of the top-k weights
    p = block.moe_normalize_expert_weights
    if p is not None and float(p) != 1.0:
        return None  # another p-norm: record only
    rule = SoftmaxTopK(router, config, renormalize=p is not None)
    rule.top_k = int(block.top_k)
    return rule


def _gemma4_rule(router, config) -> Rule:
    # Gemma4TextRouter: softmax → top-k → renorm → × per_expert_scale[id]; it returns probabilities, not logits
    return ScoredTopK(router, config, score="softmax", renormalize=True, top_k=int(config.top_k_experts),
                      expert_scale=router.per_expert_scale)


_register(ArchSpec("minimax_m2", "mlp", "gate", make_rule=_minimax_m2_rule, rule_needs_block=True))
_register(ArchSpec("afmoe", "mlp", "router", shared_attrs=("shared_experts",), make_rule=_afmoe_rule,
                   rule_needs_block=True, router_weight="gate.weight"))
_register(ArchSpec("lfm2_moe", "feed_forward", "gate", make_rule=_lfm2_moe_rule, rule_needs_block=True))
_register(ArchSpec("ernie4_5_moe", "mlp", "gate", shared_attrs=("shared_experts",), make_rule=_ernie_rule))
_register(ArchSpec("hunyuan_v1_moe", "mlp", "gate", shared_attrs=("shared_mlp",), router_weight="wg.weight",
                   make_rule=lambda r, c: SoftmaxTopK(r, c, renormalize=True),
                   note="shared MLP always on; routed experts behind its own gate (softmax, renorm)"))
_register(ArchSpec("longcat_flash", "mlp", "router", make_rule=_longcat_rule, router_weight="classifier.weight",
                   zero_experts=lambda config: int(config.zero_expert_num or 0),
                   note="zero-computation experts: ids ≥ n_routed_experts return their input × weight"))
_register(ArchSpec("llama4_text", "feed_forward", "router", shared_attrs=("shared_expert",), make_rule=_llama4_rule,
                   router_io="dense_scores", expert_layout="transposed",
                   note="router score multiplies the expert's input; experts run densely over all E"))
def _hy_v3_rule(router, config, block) -> Rule:
    # HYV3TopKRouter: sigmoid; the block's e_score_correction_bias for selection; renorm; × router_scaling_factor
    return ScoredTopK(router, config, score="sigmoid", bias=block.e_score_correction_bias, renormalize=True,
                      scaling=float(router.router_scaling_factor))


def _kolibri_rule(router, config) -> Rule:
    # Kolibri1TopKRouter: top-k of logits + e_score_correction_bias; weights sigmoid(logit), renorm if norm_topk_prob
    return ScoredTopK(router, config, score="sigmoid", bias=router.e_score_correction_bias, bias_on_logits=True,
                      renormalize=bool(router.norm_topk_prob))


_register(ArchSpec("jetmoe", "mlp", "router", make_rule=TopKSoftmax, router_io="jetmoe", router_weight="layer.weight",
                   experts_attr="", expert_layout="jetmoe", attention_experts="self_attention.experts",
                   note="MLP experts routed (top-k logits → softmax); the attention experts (MoA) are mapped, "
                        "not controlled"))
_register(ArchSpec("hy_v3", "mlp", "gate", shared_attrs=("shared_experts",), make_rule=_hy_v3_rule,
                   rule_needs_block=True))
_register(ArchSpec("kolibri1", "mlp", "gate", shared_attrs=("shared_experts",), make_rule=_kolibri_rule))
for _gemma in ("gemma4_text", "diffusion_gemma_text"):
    _register(ArchSpec(_gemma, "", "router", shared_attrs=("mlp",), make_rule=_gemma4_rule, router_io="probs",
                       router_weight="proj.weight",
                       note="MoE block beside the dense MLP in each layer (enable_moe_block); router on a normed input"))
_register(ArchSpec("ernie4_5_vl_moe_text", "mlp.text_moe", "gate", shared_attrs=("mlp.shared_experts",),
                   make_rule=_ernie_rule,
                   note="text experts (text_moe); the vision experts only see image/video tokens"))
_register(ArchSpec("dbrx", "ffn", "router", make_rule=_dbrx_rule, rule_needs_block=True, router_io="logits",
                   router_weight="layer.weight", expert_layout="none", layers_path="transformer.blocks",
                   note="experts stored as 2-D w1/v1/w2 (no per-expert weight views)"))
