"""A JSON-serialisable description of a loaded model's MoE structure (``moekit inspect``)."""

from __future__ import annotations


def describe(lm) -> dict:
    """A JSON-serialisable description of a loaded model's MoE structure."""
    from moekit.models.loading import footprint

    moe = lm.moe
    params = moe.param_counts(lm.model)
    size = footprint(lm)
    layers = [
        {
            "layer": v.index, "num_experts": v.num_experts, "top_k": v.top_k,
            "shared": {name: sum(p.numel() for p in m.parameters()) for name, m in v.shared.items()},
            "rule": v.rule_name, "renormalize": v.renormalize, "expert_hidden": v.intermediate_size,
            "expert_params": v.expert_param_count(), "has_bias": v.has_bias,
        }
        for v in moe
    ]
    return {
        "model": lm.name, "architecture": moe.model_type, "generic_mapping": moe.generic,
        "decoder_layers": moe.num_decoder_layers, "moe_layers": len(moe),
        "dense_layers": [i for i in range(moe.num_decoder_layers) if i not in moe.indices],
        "hidden_size": int(lm.config.hidden_size), "vocab_size": int(lm.config.vocab_size),
        "params_total": params["total"], "params_active": params["active"],
        "params_routed_experts": params["routed_experts"],
        "dtype": str(next(lm.model.parameters()).dtype).replace("torch.", ""), "bytes_total": size["total"],
        "bytes_routed_experts": size["experts"], "bytes_resident": size["resident"], "layers": layers,
    }
