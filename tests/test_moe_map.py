"""MoEMap on every supported architecture, the generic path and the refusals (issue 2, req. 3)."""

import pytest
import torch
from torch import nn

import moekit
from moekit.errors import MoekitError, NotAnMoEModel, UnsupportedArchitecture
from moekit.models import build_moe_map, from_model
from moekit.testing import TINY_ARCHS, random_batch, tiny_model

EXPECTED = {  # arch: (MoE layer indices, E, k, shared module names, renormalised)
    "mixtral": ([0, 1, 2], 8, 2, [], True),
    "qwen2_moe": ([0, 1, 2], 8, 2, ["shared_expert", "shared_expert_gate"], False),
    "qwen3_moe": ([0, 2], 8, 2, [], True),
    "olmoe": ([0, 1, 2], 8, 2, [], False),
    "deepseek_v2": ([1, 2], 8, 3, ["shared_experts"], False),
    "deepseek_v3": ([1, 2], 8, 3, ["shared_experts"], True),
    "gpt_oss": ([0, 1, 2], 8, 2, [], True),
    "granitemoe": ([0, 1, 2], 8, 2, [], True),
    "phimoe": ([0, 1, 2], 8, 2, [], False),
    "glm4_moe": ([1, 2], 8, 3, ["shared_experts"], True),
    "dots1": ([1, 2], 8, 3, ["shared_experts"], True),
}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_map_structure(arch):
    model = tiny_model(arch)
    moe = build_moe_map(model)
    layers, E, k, shared, renorm = EXPECTED[arch]
    assert moe.model_type == arch and moe.indices == layers and not moe.generic
    for v in moe:
        assert (v.num_experts, v.top_k, sorted(v.shared)) == (E, k, sorted(shared))
        assert v.renormalize == renorm


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_expert_weights_are_views_that_compute_the_expert(arch):
    """The gate/up/down views share storage with the fused parameters, and a hand-written SwiGLU
    (or GPT-OSS's clamped variant) over them equals the experts module's own output."""
    model = tiny_model(arch)
    v = build_moe_map(model).layers[0]
    w = v.expert_weights(3)
    params = {p.data_ptr() for p in v.experts.parameters()}
    for t in w.values():
        assert t.untyped_storage().data_ptr() in params  # a view into a fused parameter, not a copy
    x = torch.randn(5, v.hidden_size)
    ids = torch.full((5, 1), 3)
    with torch.no_grad():
        got = v.experts(x, ids, torch.ones(5, 1))
        g = x @ w["gate"].T + w.get("gate_bias", 0)
        u = x @ w["up"].T + w.get("up_bias", 0)
        if arch == "gpt_oss":
            ex = v.experts
            g, u = g.clamp(max=ex.limit), u.clamp(-ex.limit, ex.limit)
            h = (u + 1) * (g * torch.sigmoid(g * ex.alpha))
        else:
            h = v.experts.act_fn(g) * u
        want = h @ w["down"].T + w.get("down_bias", 0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(IndexError):
        v.expert_weights(8)


def test_param_counts_by_hand():
    model = tiny_model("mixtral")
    counts = build_moe_map(model).param_counts(model)
    H, width, E, k, L = 32, 24, 8, 2, 3
    per_expert = 3 * H * width
    assert counts["routed_experts"] == L * E * per_expert
    assert counts["total"] - counts["active"] == L * (E - k) * per_expert


def test_dense_model_is_not_moe():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=32)
    with pytest.raises(NotAnMoEModel, match="mixtral"):
        build_moe_map(AutoModelForCausalLM.from_config(cfg))


class _Renamed(nn.Module):
    """A block following the v5 convention under an unlisted model type (generic path)."""


def test_generic_path_verifies_the_rule():
    model = tiny_model("olmoe")
    model.config.model_type = "my_new_moe"
    lm = from_model(model)
    assert lm.moe.generic and lm.moe.indices == [0, 1, 2]
    assert lm.moe.layers[0].rule.name == "softmax_then_topk" and not lm.moe.layers[0].renormalize
    batch = random_batch(seed=3)
    with torch.no_grad(), moekit.route(lm, disable={(0, 1)}), moekit.record(lm) as rec:
        lm.model(**batch)
    assert not (rec.trace.ids[0] == 1).any()


def test_generic_path_verifies_the_sigmoid_group_rule():
    """An unlisted DeepSeek-V3-style model (selection bias, groups, scaling) gets the sigmoid group rule, and
    routing control through it reproduces what the registered architecture computes."""
    batch = random_batch(seed=4)
    outs = []
    for model_type in ("deepseek_v3", "my_v3_clone"):
        model = tiny_model("deepseek_v3")
        model.config.model_type = model_type
        lm = from_model(model)
        assert lm.moe.generic == (model_type != "deepseek_v3")
        assert lm.moe.layers[0].rule.name == "sigmoid_group" and lm.moe.indices == [1, 2]
        with torch.no_grad(), moekit.route(lm, disable={(1, 2)}, top_k=2):
            outs.append(lm.model(**batch).logits)
    assert torch.equal(outs[0], outs[1])


def test_generic_path_with_unknown_rule_records_but_refuses_control():
    model = tiny_model("olmoe")
    model.config.model_type = "odd_moe"
    for layer in model.model.layers:  # a router whose rule is none of the known ones (tanh of the top logits)
        router = layer.mlp.gate
        router.forward = (lambda r: lambda h: (lambda lg: (lg, lg.topk(2)[0].tanh(), lg.topk(2)[1]))(
            torch.nn.functional.linear(h.reshape(-1, r.weight.shape[1]), r.weight) * -1.0))(router)
    lm = from_model(model)
    assert lm.moe.layers[0].rule is None and lm.moe.layers[0].rule_name == "unknown"
    with torch.no_grad(), moekit.record(lm) as rec:
        lm.model(**random_batch())
    assert rec.trace.num_tokens == 24
    with pytest.raises(UnsupportedArchitecture), moekit.route(lm, disable={(0, 1)}):
        pass


def test_legacy_expert_list_is_not_supported_yet():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)
    model = AutoModelForCausalLM.from_config(cfg)
    model.model.layers[0].mlp.experts = nn.ModuleList([nn.Linear(4, 4) for _ in range(4)])
    with pytest.raises(UnsupportedArchitecture, match="not support yet"):
        build_moe_map(model)


def test_layer_lookup_errors():
    lm = from_model(tiny_model("deepseek_v3"))
    with pytest.raises(MoekitError, match="not an MoE layer"):
        lm.moe.layer(0)  # a dense first layer
    with pytest.raises(MoekitError, match="out of range"):
        lm.moe.check_expert(1, 8)
