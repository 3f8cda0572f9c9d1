"""The selection math is written once (moekit.routing_math): the architecture rules and the router zoo agree."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from moekit.analysis import experts_to_mass
from moekit.models.rules import ScoredTopK, SigmoidGroup, SoftmaxGroupMax, SoftmaxTopK, TopKSoftmax
from moekit.nn import build_router
from moekit.routing_math import group_limited_topk, kept_groups, top_p_counts


def _identity(name: str, e: int, k: int, **kw):
    router = build_router(name, e, e, k, **kw)
    with torch.no_grad():
        router.weight.copy_(torch.eye(e))
    return router.eval()


def _logits(seed: int, t: int = 64, e: int = 8) -> torch.Tensor:
    return torch.randn(t, e, generator=torch.Generator().manual_seed(seed)) * 2


def test_softmax_topk_rule_equals_router():
    x = _logits(0)
    for renorm in (True, False):
        rule = SoftmaxTopK(SimpleNamespace(top_k=2, norm_topk_prob=renorm), None)
        sel = rule.select(x)
        out = _identity("topk_softmax", 8, 2, renorm=renorm)(x)
        assert torch.equal(sel.ids, out.ids)
        assert torch.equal(sel.weights, out.weights)


def test_topk_then_softmax_rule_equals_router():
    x = _logits(1)
    sel = TopKSoftmax(SimpleNamespace(top_k=3), None).select(x)
    out = _identity("topk_then_softmax", 8, 3)(x)
    assert torch.equal(sel.ids, out.ids)
    assert torch.equal(sel.weights, out.weights)


def test_deepseek_v3_rule_equals_router():
    x = _logits(2)
    router = _identity("sigmoid_bias", 8, 2, n_group=4, topk_group=2, routed_scaling=2.5)
    router.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.4, 8))
    hf_like = SimpleNamespace(top_k=2, num_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                              e_score_correction_bias=router.e_score_correction_bias)
    sel = SigmoidGroup(hf_like, None).select(x)
    out = router(x)
    # same experts in the same order, the same weights; and the plain group-limited top-k picks them too
    assert torch.equal(sel.ids, out.ids)
    assert torch.equal(sel.weights, out.weights)
    choice = torch.sigmoid(x) + router.e_score_correction_bias
    assert torch.equal(group_limited_topk(choice, 2, 4, 2), out.ids)
    # ScoredTopK with the same parameters is the same rule
    scored = ScoredTopK(hf_like, None, score="sigmoid", bias=router.e_score_correction_bias, scaling=2.5,
                        n_group=4, topk_group=2).select(x)
    assert torch.equal(scored.ids, out.ids) and torch.equal(scored.weights, out.weights)


def test_top_p_rule_equals_router_and_analysis():
    x = _logits(3, t=256)
    for p in (0.3, 0.5, 0.8, 0.95):
        rule = SoftmaxTopK(SimpleNamespace(top_k=2, norm_topk_prob=False), None)
        sel = rule.select(x, top_p=p)
        out = _identity("top_p", 8, 1, p=p)(x)
        real = out.ids < 8
        assert torch.equal(sel.valid.sum(-1), real.sum(-1))
        # the same experts with the same (raw probability) weights, slot by slot
        assert torch.equal(torch.where(sel.valid, sel.ids, 8), out.ids[:, : sel.ids.shape[1]])
        assert torch.equal(sel.weights, out.weights[:, : sel.ids.shape[1]])
        # the numpy twin in analysis (torch-free by contract) counts the same on the same probabilities
        probs = torch.softmax(x.double(), dim=-1)
        assert experts_to_mass(probs.numpy(), p).tolist() == top_p_counts(probs, p).tolist()


def test_group_scores_max_vs_top2_hand_worked():
    # groups of 2: {0,1} best 0.9 / top-2 sum 1.0; {2,3} best 0.6 / sum 1.15; {4,5} 0.8 / 0.85; {6,7} 0.3 / 0.6
    s = torch.tensor([[0.9, 0.1, 0.6, 0.55, 0.8, 0.05, 0.3, 0.3]])
    by_max = kept_groups(s, 4, 2, 2, rank=1)  # DeepSeek-V2 group_limited_greedy: groups {0,1} and {4,5}
    by_top2 = kept_groups(s, 4, 2, 2, rank=2)  # DeepSeek-V3: groups {0,1} and {2,3}
    assert by_max.nonzero()[:, 1].tolist() == [0, 1, 4, 5]
    assert by_top2.nonzero()[:, 1].tolist() == [0, 1, 2, 3]
    # a k larger than the kept groups hold keeps more groups (routing control raising k)
    assert kept_groups(s, 4, 1, 3, rank=2).sum().item() == 4
    # and the DeepSeek-V2 rule selects inside the groups by their best expert
    rule = SoftmaxGroupMax(SimpleNamespace(top_k=2, num_group=4, topk_group=2, norm_topk_prob=False), None)
    assert rule.select(torch.log(s)).ids.tolist() == [[0, 4]]


def test_unknown_score_function_is_rejected():
    with pytest.raises(ValueError, match="unknown score function 'relu'"):
        ScoredTopK(SimpleNamespace(top_k=2), None, score="relu")


def test_top_p_counts_hand_worked():
    probs = np.array([[0.5, 0.3, 0.2], [0.9, 0.06, 0.04], [0.4, 0.4, 0.2]])
    assert top_p_counts(torch.tensor(probs), 0.6).tolist() == [2, 1, 2]
    assert experts_to_mass(probs, 0.6).tolist() == [2, 1, 2]
