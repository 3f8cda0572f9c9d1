"""Expert analytics over routing traces: pure numpy functions (never torch, never a model).

Each function's docstring names its source.  Inputs are numpy arrays (``ids`` ``[N, K]`` for one
layer or ``[L, N, K]``, ``probs`` ``[..., E]``, per-token ``doc`` / ``domain`` / ``token_ids``);
``summarize`` and the ``*_summary`` / ``cache_curves`` helpers take a ``RoutingTrace``.
"""

from moekit.analysis.cache import (
    MULTIPLIERS,
    POLICIES,
    cache_curves,
    capacities_for,
    next_use,
    simulate_cache,
)
from moekit.analysis.coactivation import coactivation, layer_affinity
from moekit.analysis.dynamic_k import dynamic_k_profile, experts_to_mass
from moekit.analysis.load import expert_load, layer_summary, load_stats, router_entropy
from moekit.analysis.locality import (
    SEG_LENS,
    sch,
    sch_layers,
    sch_model,
    segment_count_histogram,
    segment_count_histograms,
    srp,
    srp_from_histogram,
    srp_layers,
)
from moekit.analysis.npmi import expert_token_npmi, token_class_mask
from moekit.analysis.specialization import (
    domain_frequency,
    domain_mutual_information,
    shuffled_mi,
    top_experts_per_domain,
)
from moekit.analysis.summary import jsonable, summarize
from moekit.analysis.super_experts import detect_super_experts

__all__ = [
    "MULTIPLIERS",
    "POLICIES",
    "SEG_LENS",
    "cache_curves",
    "capacities_for",
    "coactivation",
    "detect_super_experts",
    "domain_frequency",
    "domain_mutual_information",
    "dynamic_k_profile",
    "expert_load",
    "expert_token_npmi",
    "experts_to_mass",
    "jsonable",
    "layer_affinity",
    "layer_summary",
    "load_stats",
    "next_use",
    "router_entropy",
    "sch",
    "sch_layers",
    "sch_model",
    "segment_count_histogram",
    "segment_count_histograms",
    "shuffled_mi",
    "simulate_cache",
    "srp",
    "srp_from_histogram",
    "srp_layers",
    "summarize",
    "token_class_mask",
    "top_experts_per_domain",
]
