"""Routers, losses and MoE layers against hand-written references on small tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moekit.errors import MoekitError
from moekit.nn import (
    ROUTERS,
    CoELayer,
    MoELayer,
    add_aux_loss,
    build_router,
    group_limited_topk,
    seq_balance_loss,
    switch_balance_loss,
    update_router_biases,
    z_loss,
)


def identity_router(name: str, num_logits: int, num_experts: int, top_k: int, **kw):
    """A router whose gate is the identity, so ``x`` *is* the logits: routing can be specified by hand."""
    router = build_router(name, num_logits, num_experts, top_k, **kw)
    with torch.no_grad():
        router.weight.copy_(torch.eye(num_logits))
    return router


def test_registry_lists_all_routers() -> None:
    assert set(ROUTERS.names()) >= {
        "softmax_then_topk",
        "topk_then_softmax",
        "sigmoid_bias",
        "aux_free",
        "top_p",
        "null_experts",
        "random_fixed",
    }
    with pytest.raises(MoekitError, match="unknown router 'nope'"):
        build_router("nope", 4, 4, 1)


LOGITS = [[1.0, 2.0, 3.0, 0.0], [0.5, -1.0, 2.0, 2.1], [0.2, 0.0, -3.0, 1.0]]
TOP2 = [[2, 1], [3, 2], [3, 0]]  # by hand


def test_softmax_then_topk_with_and_without_renorm() -> None:
    x = torch.tensor(LOGITS)
    for renorm in (True, False):
        out = identity_router("softmax_then_topk", 4, 4, 2, renorm=renorm)(x)
        assert out.ids.tolist() == TOP2
        e = np.exp(np.array(LOGITS))
        chosen = np.take_along_axis(e, np.array(TOP2), 1)
        ref = chosen / (chosen.sum(1, keepdims=True) if renorm else e.sum(1, keepdims=True))
        np.testing.assert_allclose(out.weights.detach().numpy(), ref, rtol=1e-6)
        assert out.logits.dtype == torch.float32 and torch.equal(out.logits, x)


def test_topk_then_softmax() -> None:
    out = identity_router("topk_then_softmax", 4, 4, 2)(torch.tensor(LOGITS))
    assert out.ids.tolist() == TOP2
    chosen = np.take_along_axis(np.array(LOGITS), np.array(TOP2), 1)
    ref = np.exp(chosen) / np.exp(chosen).sum(1, keepdims=True)
    np.testing.assert_allclose(out.weights.detach().numpy(), ref, rtol=1e-6)


def _logit(p: list[float]) -> torch.Tensor:
    p_arr = np.array(p)
    return torch.tensor(np.log(p_arr / (1 - p_arr)), dtype=torch.float32)


# Sigmoid scores for 8 experts in 4 groups of 2: group sums 1.0, 1.15, 0.85, 0.6.
SCORES = [0.9, 0.1, 0.6, 0.55, 0.8, 0.05, 0.3, 0.3]


def test_group_limited_selection_hand_worked() -> None:
    s = torch.tensor([SCORES])
    # Plain top-2 picks experts 0 and 4; groups {0,1} and {2,3} win, so expert 4 is out and 2 comes in.
    assert s.topk(2).indices.tolist() == [[0, 4]]
    assert group_limited_topk(s, 2, n_group=4, topk_group=2).tolist() == [[0, 2]]
    # group score = sum of the top 2: with groups of 4, {0..3} scores 0.9+0.6, {4..7} 0.8+0.3.
    assert group_limited_topk(s, 3, n_group=2, topk_group=1).tolist() == [[0, 2, 3]]


def test_sigmoid_bias_router_hand_worked() -> None:
    router = identity_router("sigmoid_bias", 8, 8, 2, n_group=4, topk_group=2, routed_scaling=2.5)
    x = _logit(SCORES).unsqueeze(0)
    out = router(x)
    assert out.ids.tolist() == [[0, 2]]
    torch.testing.assert_close(out.weights, torch.tensor([[0.9 / 1.5 * 2.5, 0.6 / 1.5 * 2.5]]))
    # Bias +0.5 on expert 4 lifts group {4,5} to 1.35: experts 4 and 2 win, weights from the UNBIASED scores.
    router.e_score_correction_bias[4] = 0.5
    out = router(x)
    assert out.ids.tolist() == [[4, 2]]
    torch.testing.assert_close(out.weights, torch.tensor([[0.8 / 1.4 * 2.5, 0.6 / 1.4 * 2.5]]))
    # A uniform negative bias changes nothing: masked groups must be -inf, not 0.
    router.e_score_correction_bias.fill_(-1.0)
    assert router(x).ids.tolist() == [[0, 2]]
    assert router.e_score_correction_bias.dtype == torch.float32
    assert "e_score_correction_bias" in router.state_dict()


def test_bias_update_sign_rule() -> None:
    router = build_router("sigmoid_bias", 4, 4, 1)
    bias = router.update_bias(torch.tensor([10, 2, 5, 3]), u=0.01)  # mean load 5
    torch.testing.assert_close(bias, torch.tensor([-0.01, 0.01, 0.0, 0.01]))
    # Default path: the counts the router accumulated itself, then reset.
    router.reset_counts()
    x = torch.randn(32, 4)
    out = router(x)
    counts = torch.bincount(out.ids.reshape(-1), minlength=4)
    before = router.e_score_correction_bias.clone()
    assert update_router_biases(router, u=0.5) == 1
    torch.testing.assert_close(
        router.e_score_correction_bias - before, 0.5 * torch.sign(counts.float().mean() - counts)
    )
    assert router.tokens_per_expert.sum() == 0


def test_aux_free_router_updates_itself_when_training() -> None:
    router = identity_router("aux_free", 4, 4, 1, bias_update_rate=0.1)
    x = torch.tensor([[3.0, 0.0, 0.0, 0.0]] * 6 + [[0.0, 2.0, 0.0, 0.0]] * 2)  # loads 6, 2, 0, 0; mean 2
    router.eval()
    router(x)
    assert torch.equal(router.e_score_correction_bias, torch.zeros(4))
    router.train()
    router(x)
    torch.testing.assert_close(router.e_score_correction_bias, torch.tensor([-0.1, 0.0, 0.1, 0.1]))


def _top_p_reference(probs: np.ndarray, p: float) -> list[dict[int, float]]:
    """Per token: {expert: prob} for the experts kept by the top-p rule, by plain Python loops."""
    result = []
    for row in probs:
        order = sorted(range(len(row)), key=lambda e: -row[e])
        kept, total = {}, 0.0
        for e in order:
            kept[e] = float(row[e])
            total += row[e]
            if total > p:
                break
        result.append(kept)
    return result


def test_top_p_hand_worked() -> None:
    probs = [[0.5, 0.3, 0.15, 0.05], [0.3, 0.25, 0.25, 0.2], [0.11, 0.2, 0.3, 0.39]]
    out = identity_router("top_p", 4, 4, 1, p=0.4)(torch.log(torch.tensor(probs)))
    # 0.5 > 0.4 at once; 0.3 + 0.25 > 0.4 at the 2nd; 0.39 is not > 0.4, so 0.39 + 0.3 at the 2nd.
    assert out.ids.tolist() == [[0, 4], [0, 1], [3, 2]]
    torch.testing.assert_close(out.weights, torch.tensor([[0.5, 0.0], [0.3, 0.25], [0.39, 0.3]]))


@pytest.mark.parametrize("p", [0.2, 0.4, 0.7, 0.95])
def test_top_p_counts_match_numpy(p: float) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 8) * 1.5
    router = identity_router("top_p", 8, 8, 1, p=p)
    out = router(x)
    ref = _top_p_reference(torch.softmax(x, -1).double().numpy(), p)
    real = out.ids < 8
    assert real.sum(-1).tolist() == [len(r) for r in ref]
    for t, kept in enumerate(ref):
        got = {
            int(e): float(w)
            for e, w in zip(out.ids[t][real[t]], out.weights[t][real[t]].detach(), strict=True)
        }
        assert got.keys() == kept.keys()
        np.testing.assert_allclose([got[e] for e in kept], list(kept.values()), rtol=1e-5)
    assert torch.equal(out.weights[~real], torch.zeros(int((~real).sum())))
    assert out.ids.shape[1] == max(len(r) for r in ref)  # trimmed to the widest token


def test_null_experts_hand_worked() -> None:
    logits = torch.tensor([[2.0, 0.0, 1.0, 3.0, -1.0], [1.0, 2.0, 0.0, -1.0, 0.5], [0.0, 0.0, 0.0, 5.0, 5.0]])
    router = identity_router("null_experts", 5, 3, 2, num_null=2, balance_coef=0.01)
    out = router(logits)
    assert out.ids.tolist() == [[3, 0], [1, 0], [3, 3]]  # id 3 = E = no expert
    w2 = math.exp(2) / (math.exp(2) + math.exp(1))
    torch.testing.assert_close(out.weights, torch.tensor([[0.0, 1.0], [w2, 1 - w2], [0.0, 0.0]]))
    # Balance over E+N = 5 slots: raw picks {3,0}, {1,0}, {3 or 4, the other}: f = [2,1,0,2,1]/6.
    probs = logits.softmax(-1)
    f = torch.tensor([2, 1, 0, 2, 1]) / 6
    torch.testing.assert_close(out.aux["balance"], 5 * (f * probs.mean(0)).sum())


def test_random_fixed_router_is_frozen_and_k_grows() -> None:
    router = build_router("random_fixed", 8, 8, 4, k_start=1, ramp_steps=100)
    assert [n for n, _ in router.named_parameters()] == []
    assert [router.set_step(s) for s in (0, 33, 34, 50, 99, 100, 5000)] == [1, 1, 2, 2, 3, 4, 4]
    x = torch.randn(5, 8)
    router.set_step(50)
    out = router(x)
    ref_w, ref_ids = torch.softmax(x @ router.weight.T, -1).topk(2, -1)
    assert torch.equal(out.ids, ref_ids)
    torch.testing.assert_close(out.weights, ref_w / ref_w.sum(-1, keepdim=True))


def test_switch_loss_hand_worked() -> None:
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    # balanced picks: f = [.5,.5], P = [.55,.45] -> 2 * (.275 + .225) = 1.0
    torch.testing.assert_close(switch_balance_loss(probs, torch.tensor([[0], [1]])), torch.tensor(1.0))
    # both on expert 0: f = [1, 0] -> 2 * .55 = 1.1
    torch.testing.assert_close(switch_balance_loss(probs, torch.tensor([[0], [0]])), torch.tensor(1.1))
    # the padded second token is ignored: f = [1, 0], P = [.7, .3] -> 1.4
    loss = switch_balance_loss(probs, torch.tensor([[0], [1]]), mask=torch.tensor([True, False]))
    torch.testing.assert_close(loss, torch.tensor(1.4))
    # ids >= E (no expert) are not counted
    torch.testing.assert_close(switch_balance_loss(probs, torch.tensor([[0, 2], [1, 2]])), torch.tensor(1.0))


def test_seq_balance_loss_hand_worked() -> None:
    # B=2 sequences of S=2 tokens, E=2, k=1.
    probs = torch.tensor([[[0.8, 0.2], [0.6, 0.4]], [[0.5, 0.5], [0.1, 0.9]]])
    ids = torch.tensor([[[0], [0]], [[0], [1]]])
    # seq 0: ce = [2, 0] / (2*1/2) = [2, 0]; mean s = [.7, .3] -> 1.4
    # seq 1: ce = [1, 1];                    mean s = [.3, .7] -> 1.0
    torch.testing.assert_close(seq_balance_loss(probs, ids), torch.tensor(1.2))


def test_z_loss() -> None:
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    ref = (math.log(2) ** 2 + (1 + math.log(2)) ** 2) / 2
    torch.testing.assert_close(z_loss(logits), torch.tensor(ref))
    torch.testing.assert_close(z_loss(logits, mask=torch.tensor([1, 0])), torch.tensor(math.log(2) ** 2))


def test_add_aux_loss_is_identity_and_sends_gradient() -> None:
    x = torch.randn(3, requires_grad=True)
    w = torch.tensor(2.0, requires_grad=True)
    y = add_aux_loss(x * 1.0, w**2, coef=0.5)
    assert torch.equal(y, x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3))
    torch.testing.assert_close(w.grad, torch.tensor(2.0))  # d(0.5 w^2)/dw


@pytest.mark.parametrize("router", ["softmax_then_topk", "top_p", "null_experts", "sigmoid_bias"])
def test_aux_loss_reaches_router_from_main_loss_only(router: str) -> None:
    torch.manual_seed(0)
    kw = {"balance_coef": 0.5, "z_coef": 0.1, "seq_coef": 0.3}
    layer = MoELayer(16, 8, 4, 2, router=router, router_kwargs=kw)
    x = torch.randn(2, 6, 16)
    layer(x).square().mean().backward()  # only the main loss
    with_aux = layer.router.weight.grad.clone()
    assert set(layer.last_aux) == {"balance", "z", "seq_balance"}

    layer.zero_grad()
    layer.router.coefs = {"balance": 0.0, "z": 0.0, "seq_balance": 0.0}
    layer(x).square().mean().backward()
    without = layer.router.weight.grad.clone()

    layer.zero_grad()
    layer.router.coefs = {"balance": 0.5, "z": 0.1, "seq_balance": 0.3}
    route = layer.router(x)
    layer.router.aux_loss(route.aux).backward()
    aux_only = layer.router.weight.grad.clone()
    assert aux_only.abs().sum() > 0
    torch.testing.assert_close(with_aux - without, aux_only, atol=1e-6, rtol=1e-5)


def test_moe_layer_matches_manual_computation() -> None:
    torch.manual_seed(1)
    layer = MoELayer(16, 8, 4, 2, num_shared=1)
    x = torch.randn(5, 16)
    y = layer(x)
    route = layer.router(x)
    ref = layer.shared(x)
    bank = layer.experts
    for t in range(5):
        for j in range(2):
            e = int(route.ids[t, j])
            g, u = (bank.gate_up_proj[e] @ x[t]).chunk(2)
            ref[t] = ref[t] + route.weights[t, j] * (bank.down_proj[e] @ (F.silu(g) * u))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_fine_grained_layer_shapes() -> None:
    layer = MoELayer.fine_grained(16, 32, num_experts=4, top_k=1, granularity=4, num_shared=2)
    assert (layer.num_experts, layer.top_k, layer.inter) == (16, 4, 8)
    assert layer.experts.gate_up_proj.shape == (16, 16, 16)
    assert layer.shared.down.weight.shape == (16, 16)  # 2 shared experts of width 8
    assert layer(torch.randn(3, 16)).shape == (3, 16)
    with pytest.raises(ValueError, match="does not divide"):
        MoELayer.fine_grained(16, 30, 4, 1, granularity=4)


def test_coe_layer_iterates_with_one_router_per_step() -> None:
    torch.manual_seed(2)
    layer = CoELayer(16, 8, 4, 2, iterations=2)
    assert len(layer.routers) == 2 and layer.routers[0] is not layer.routers[1]
    x = torch.randn(6, 16)
    state = x
    for router in layer.routers:
        route = router(state)
        state = state + layer.experts(state, route.ids, route.weights)
    torch.testing.assert_close(layer(x), state - x)
    layer.output = "state"
    torch.testing.assert_close(layer(x), state)
