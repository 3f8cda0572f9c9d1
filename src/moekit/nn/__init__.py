"""MoE building blocks: fast expert dispatch, the routers and losses of the literature, MoE layers."""

from __future__ import annotations

from moekit.nn.dispatch import (
    BACKENDS,
    combine_slots,
    expert_counts,
    expert_forward,
    get_backend,
    moekit_experts_forward,
    register_with_transformers,
    set_backend,
)
from moekit.nn.expert_parallel import ExpertParallelBank, all_to_all, shard_experts
from moekit.nn.int4_experts import expert_forward_int4, int4_expert_bytes, quantize_experts_int4
from moekit.nn.int8_experts import (
    dequantize_linears_int8,
    expert_forward_int8,
    quantize_experts_int8,
    quantize_linears_int8,
    quantize_rows_int8,
)
from moekit.nn.layers import CoELayer, ExpertBank, GatedMLP, MoELayer
from moekit.nn.losses import AddAuxiliaryLoss, add_aux_loss, seq_balance_loss, switch_balance_loss, z_loss
from moekit.nn.model import MoELM, MoELMConfig
from moekit.nn.routers import (
    ROUTERS,
    Router,
    RouterOutput,
    build_router,
    group_limited_topk,
    update_router_biases,
)

register_with_transformers()

__all__ = [
    "BACKENDS",
    "ROUTERS",
    "AddAuxiliaryLoss",
    "CoELayer",
    "ExpertBank",
    "ExpertParallelBank",
    "GatedMLP",
    "MoELM",
    "MoELMConfig",
    "MoELayer",
    "Router",
    "RouterOutput",
    "add_aux_loss",
    "all_to_all",
    "build_router",
    "expert_counts",
    "expert_forward",
    "expert_forward_int4",
    "expert_forward_int8",
    "combine_slots",
    "get_backend",
    "group_limited_topk",
    "moekit_experts_forward",
    "int4_expert_bytes",
    "quantize_experts_int4",
    "quantize_experts_int8",
    "quantize_linears_int8",
    "dequantize_linears_int8",
    "quantize_rows_int8",
    "register_with_transformers",
    "seq_balance_loss",
    "set_backend",
    "shard_experts",
    "switch_balance_loss",
    "update_router_biases",
    "z_loss",
]
