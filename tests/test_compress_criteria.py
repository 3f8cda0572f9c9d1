"""Observer statistics, pruning criteria and budget selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moekit
from moekit.compress import CRITERIA, choose, observe_batches, scores, select_kept
from moekit.compress.observer import CalibStats, LayerStats
from moekit.errors import MoekitError
from moekit.experts import ExpertRef, ExpertSet
from moekit.testing import TINY_ARCHS, random_batch, tiny_lm


def _batches(vocab=128, n=2):
    return [random_batch(vocab=vocab, batch=2, seq=16, seed=s, pad_last=4) for s in range(n)]


def test_registry_lists_all_criteria():
    assert CRITERIA.names() == ["random", "frequency", "gate-sum", "ean", "reap", "easy-ep"]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_counts_and_gates_match_recorded_routing(arch):
    lm = tiny_lm(arch)
    batches = _batches()
    stats = observe_batches(lm, batches)
    with moekit.record(lm, fields=("ids", "weights")) as rec:
        for b in batches:
            lm.model(**b, use_cache=False)
    ids, ws = rec.tensor("ids"), rec.tensor("weights")
    for pos, v in enumerate(lm.moe):
        st = stats.layers[v.index]
        count = np.bincount(ids[pos].reshape(-1).long().clamp_min(0).numpy(), minlength=v.num_experts)
        gate = np.zeros(v.num_experts)
        np.add.at(gate, ids[pos].reshape(-1).long().numpy(), ws[pos].reshape(-1).double().numpy())
        assert st.tokens == int(sum(b["attention_mask"].sum() for b in batches)) == ids[pos].shape[0]
        np.testing.assert_array_equal(st.count, count)
        np.testing.assert_allclose(st.gate_sum, gate, rtol=1e-5, atol=1e-6)
        assert np.isnan(st.max_abs[st.count == 0]).all() and (st.max_abs[st.count > 0] > 0).all()


@torch.no_grad()
def test_reap_ean_easy_match_a_hand_computation():
    lm = tiny_lm("qwen3_moe")
    batches = _batches()
    stats = observe_batches(lm, batches)
    with moekit.record(lm, fields=("ids", "weights", "hidden")) as rec:
        for b in batches:
            lm.model(**b, use_cache=False)
    v, pos = lm.moe.layers[1], 1
    h, ids, w = rec.tensor("hidden")[pos], rec.tensor("ids")[pos].long(), rec.tensor("weights")[pos]
    st = stats.layers[v.index]
    for e in range(v.num_experts):
        rows, slot = (ids == e).nonzero(as_tuple=True)
        if len(rows) == 0:
            assert st.count[e] == 0 and st.reap_sum[e] == 0
            continue
        W = v.expert_weights(e)
        x = h[rows]
        f = (torch.nn.functional.silu(x @ W["gate"].T) * (x @ W["up"].T)) @ W["down"].T
        norms = f.norm(dim=-1).double()
        g = w[rows, slot].double()
        assert st.norm_sum[e] == pytest.approx(float(norms.sum()), rel=1e-5)
        assert st.reap_sum[e] == pytest.approx(float((g * norms).sum()), rel=1e-5)
        assert st.max_abs[e] == pytest.approx(float(f.abs().max()), rel=1e-5)
        # EASY-EP weights each token by a contribution in [0, 2]
        assert 0 <= st.easy_sum[e] <= 2 * st.reap_sum[e] + 1e-9
    s = scores(stats, "reap")[v.index]
    np.testing.assert_allclose(s, st.mean("reap_sum"))


def _stats(values: dict[int, list[float]], k=2) -> CalibStats:
    layers = {}
    for li, vals in values.items():
        st = LayerStats(li, len(vals), k)
        st.count = np.array(vals, dtype=float)
        layers[li] = st
    return CalibStats(layers, tokens=100)


def test_per_layer_selection_drops_lowest_and_breaks_ties_by_id():
    s = {1: np.array([5.0, 1.0, 3.0, 1.0, 9.0, 0.0, 2.0, 7.0])}
    assert select_kept(s, 0.25, {1: 2}) == {1: [0, 1, 2, 4, 6, 7]}  # drops 5 (0.0) and 3 (tie 1.0, higher id)
    assert select_kept(s, 0.5, {1: 2}) == {1: [0, 2, 4, 7]}
    assert select_kept(s, 0.5, {1: 2}, protect=[(1, 5)]) == {1: [0, 4, 5, 7]}
    with pytest.raises(MoekitError, match="fewer than top-k"):
        select_kept(s, 0.9, {1: 2})


def test_global_budget_normalises_per_layer_and_keeps_top_k():
    # layer 0 scores are 100x larger but normalised away; layer 1 has one dominant expert
    s = {0: np.array([100.0, 100.0, 100.0, 100.0]), 1: np.array([97.0, 1.0, 1.0, 1.0])}
    kept = select_kept(s, 0.5, {0: 1, 1: 1}, global_budget=True)
    # budget 4: top-1 each (0:0, 1:0) then the 2 best normalised: layer 0 experts 1, 2 (0.25 > 0.01)
    assert kept == {0: [0, 1, 2], 1: [0]}
    with pytest.raises(MoekitError, match="fewer"):
        select_kept(s, 0.9, {0: 1, 1: 1}, global_budget=True)


def test_random_is_seeded_and_frequency_uses_counts():
    lm = tiny_lm("olmoe")
    st = _stats({v.index: list(range(8)) for v in lm.moe})
    a = choose(lm, st, "random", 0.5, seed=1).kept
    assert a == choose(lm, st, "random", 0.5, seed=1).kept
    assert a != choose(lm, st, "random", 0.5, seed=2).kept
    assert choose(lm, st, "frequency", 0.5).kept == {v.index: [4, 5, 6, 7] for v in lm.moe}


def test_protect_super_keeps_detected_experts():
    lm = tiny_lm("olmoe")
    st = _stats({v.index: [8, 7, 6, 5, 4, 3, 2, 1] for v in lm.moe})
    for li in st.layers:
        st.layers[li].max_abs = np.ones(8)
    first = lm.moe.indices[0]
    st.layers[first].max_abs[7] = 50.0  # one massive expert in the first layer
    res = choose(lm, st, "frequency", 0.5, protect_super=True)
    assert res.protected == ExpertSet([ExpertRef(first, 7)])
    assert res.kept[first] == [0, 1, 2, 7]
    # explicit protection adds to the super experts; every other layer keeps its four most used
    last = lm.moe.indices[-1]
    res = choose(lm, st, "frequency", 0.5, protect_super=True, protect=ExpertSet.parse(f"{last}:6,{last}:7"))
    assert res.protected.to_list() == [f"{first}:7", f"{last}:6", f"{last}:7"]
    assert res.kept[first] == [0, 1, 2, 7] and res.kept[last] == [0, 1, 6, 7]
    assert res.summary()["protected"] == [f"{first}:7", f"{last}:6", f"{last}:7"]
    with pytest.raises(MoekitError, match=f"expert {first}:8 is not in this model"):
        choose(lm, st, "frequency", 0.5, protect=ExpertSet.parse(f"{first}:8"))


def test_demo_step_reports_perplexity_before_and_after(tmp_path):
    from moekit.compress import demo_step
    from moekit.testing import save_tiny_checkpoint

    lm = moekit.load(save_tiny_checkpoint("qwen3_moe", tmp_path / "m"))
    r = demo_step(lm, max_tokens=512)
    assert r["experts_before"] == 16 and r["experts_after"] == 12 and r["eval_tokens"] == 512
    assert r["params_after"] < r["params_before"]
    assert r["perplexity_before"] > 1 and r["perplexity_after"] > 1
    assert set(r["by_domain_before"]) == set(r["by_domain_after"])


def test_ratio_check_is_one_rule_for_prune_merge_and_selection():
    """prune (``choose``), merge (``merge`` and ``plan_groups``) and ``select_kept`` refuse the same ratio with the
    same message, and accept the largest ratio that still leaves top-k experts."""
    from moekit.compress.criteria import check_ratio, experts_kept
    from moekit.compress.merge import merge, plan_groups

    lm = tiny_lm("qwen3_moe")
    v = lm.moe.layers[0]
    E, k = v.num_experts, v.top_k
    stats = CalibStats({w.index: LayerStats(w.index, w.num_experts, w.top_k) for w in lm.moe}, tokens=0)
    too_far = (E - k + 1) / E  # drops one expert too many
    want = f"ratio {too_far} leaves {k - 1} experts in layer {v.index}, fewer than top-k = {k}"
    calls = [
        lambda: choose(lm, None, "random", too_far),
        lambda: merge(lm, too_far, stats),
        lambda: plan_groups(lm, stats, too_far),
        lambda: select_kept({w.index: np.ones(w.num_experts) for w in lm.moe}, too_far,
                            {w.index: w.top_k for w in lm.moe}),
        lambda: check_ratio({w.index: (w.num_experts, w.top_k) for w in lm.moe}, too_far),
    ]
    for call in calls:
        with pytest.raises(MoekitError) as err:
            call()
        assert str(err.value) == want
    just_enough = (E - k) / E
    assert experts_kept(E, k, just_enough, v.index) == k
    assert [len(x) for x in choose(lm, None, "random", just_enough).kept.values()] == [k] * len(lm.moe)
    # under a global budget only the total counts
    with pytest.raises(MoekitError, match="fewer experts in all than top-k per layer"):
        check_ratio({0: (E, k), 1: (E, k)}, too_far, global_budget=True)
    check_ratio({0: (E, k), 1: (E, k)}, just_enough, global_budget=True)
