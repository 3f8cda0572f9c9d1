"""Load, co-activation, affinity, dynamic-k and super experts: hand examples and loop references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moekit.analysis import (
    coactivation,
    detect_super_experts,
    dynamic_k_profile,
    expert_load,
    experts_to_mass,
    layer_affinity,
    layer_summary,
    load_stats,
    router_entropy,
)
from moekit.errors import MoekitError
from moekit.trace import RoutingTrace


# ------------------------------------------------------------------------------------------ load
def test_load_stats_hand_worked():
    # ids (k=1, E=4): 0 0 0 1 -> counts [3,1,0,0], mean 1, population std sqrt((4+0+1+1)/4)=1.224745,
    # cv = 1.224745, max/mean = 3, load entropy = -(.75 ln .75 + .25 ln .25) = 0.562335 nats.
    st = load_stats(np.array([[0], [0], [0], [1]]), 4)
    assert st["counts"] == [3, 1, 0, 0]
    assert st["cv"] == pytest.approx(1.224745, abs=1e-6)
    assert st["max_over_mean"] == pytest.approx(3.0)
    assert st["entropy"] == pytest.approx(0.562335, abs=1e-6)
    assert st["entropy_norm"] == pytest.approx(0.562335 / math.log(4), abs=1e-6)
    assert st["dead"] == 2 and st["total"] == 4


def test_expert_load_ignores_missing_and_checks_range():
    assert expert_load(np.array([[0, -1], [2, 0]]), 3).tolist() == [2, 0, 1]
    with pytest.raises(MoekitError):
        expert_load(np.array([[0, 3]]), 3)


def test_router_entropy_hand_worked():
    # rows [1,0] -> 0 ; [.5,.5] -> ln 2 ; mean = ln2 / 2
    p = np.array([[1.0, 0.0], [0.5, 0.5]], dtype=np.float16)
    assert router_entropy(p) == pytest.approx(math.log(2) / 2, abs=1e-6)


def test_layer_summary_on_trace():
    ids = np.array([[[0, 1], [0, 2]], [[1, 2], [1, 2]]], dtype=np.int16)
    probs = np.full((2, 2, 3), 1 / 3, dtype=np.float16)
    tr = RoutingTrace(ids=ids, weights=np.ones(ids.shape, np.float32), probs=probs,
                      token_ids=np.zeros(2, np.int32), doc=np.zeros(2, np.int32), pos=np.arange(2, dtype=np.int32),
                      meta={"num_experts": 3, "top_k": 2, "layers": [1, 3]})
    rows = layer_summary(tr)
    assert [r["layer"] for r in rows] == [1, 3]
    assert rows[1]["dead"] == 1
    assert rows[0]["router_entropy"] == pytest.approx(math.log(3), abs=1e-3)


# ---------------------------------------------------------------------------------- co-activation
def test_coactivation_hand_worked():
    # tokens {0,1}, {0,2}, {0,1}: C[0,1]=2, C[0,2]=1, C[1,2]=0, diagonal = load [3,2,1]
    c = coactivation(np.array([[0, 1], [2, 0], [1, 0]]), 3)
    assert c.tolist() == [[3, 2, 1], [2, 2, 0], [1, 0, 1]]


def test_coactivation_and_affinity_match_loops():
    rng = np.random.default_rng(0)
    for _ in range(20):
        e, k, n = int(rng.integers(2, 9)), int(rng.integers(1, 4)), int(rng.integers(1, 50))
        a = rng.integers(-1, e, size=(n, k))  # repeats and -1 allowed: a selection is a set
        b = rng.integers(-1, e, size=(n, k))
        ref = np.zeros((e, e), dtype=int)
        aff = np.zeros((e, e), dtype=int)
        for t in range(n):
            sa = {int(x) for x in a[t] if x >= 0}
            sb = {int(x) for x in b[t] if x >= 0}
            for x in sa:
                for y in sa:
                    ref[x, y] += 1
                for y in sb:
                    aff[x, y] += 1
        assert (coactivation(a, e) == ref).all()
        assert (layer_affinity(a, b, e, e, normalize="none") == aff).all()
        row = layer_affinity(a, b, e, e)
        tot = aff.sum(axis=1, keepdims=True)
        assert np.allclose(row, np.where(tot > 0, aff / np.maximum(tot, 1), 0))
        tok = layer_affinity(a, b, e, e, normalize="token")
        load = np.diag(ref).reshape(-1, 1)
        assert np.allclose(tok, np.where(load > 0, aff / np.maximum(load, 1), 0))


def test_affinity_hand_worked():
    # layer l picks 0,0,1 ; layer l+1 picks 2,3,2 (k=1): P(.|0) = [0,0,.5,.5], P(.|1) = [0,0,1,0]
    p = layer_affinity(np.array([[0], [0], [1]]), np.array([[2], [3], [2]]), 2, 4)
    assert p.tolist() == [[0, 0, 0.5, 0.5], [0, 0, 1.0, 0]]


# ------------------------------------------------------------------------------------- dynamic k
def test_experts_to_mass_hand_worked():
    # sorted [.5, .3, .2], cumsum [.5, .8, 1.0]: p=.4 -> first > .4 is .5 -> 1 ; p=.5 -> .8 -> 2 ;
    # p=.8 -> 1.0 -> 3 ; p=.79 -> .8 -> 2
    row = np.array([[0.2, 0.5, 0.3]])
    assert [int(experts_to_mass(row, p)[0]) for p in (0.4, 0.5, 0.79, 0.8)] == [1, 2, 2, 3]
    assert int(experts_to_mass(np.array([[0.25, 0.25, 0.25, 0.24]]), 1.0)[0]) == 4  # capped at E


def test_experts_to_mass_matches_loop():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(8) * 0.5, size=200)
    for p in (0.3, 0.5, 0.9):
        want = []
        for row in probs:
            acc, n = 0.0, 0
            for v in sorted(row.tolist(), reverse=True):
                acc += v
                n += 1
                if acc > p:
                    break
            want.append(n)
        assert experts_to_mass(probs, p).tolist() == want


def test_dynamic_k_profile_by_domain():
    probs = np.array([[[1.0, 0.0], [0.5, 0.5], [0.6, 0.4]]])  # [L=1, N=3, E=2]
    # p=.5: token0 -> 1, token1 -> cumsum [.5, 1] -> 2, token2 -> .6 > .5 -> 1 ; mean 4/3
    out = dynamic_k_profile(probs, np.array([0, 1, 1]), ps=(0.5,))
    assert out["mean"][0][0] == pytest.approx(4 / 3)
    assert out["by_domain"][0] == [[1.0], [1.5]]
    assert out["hist"][0][0] == [2, 1]


# ---------------------------------------------------------------------------------- super experts
def test_detect_super_experts_planted():
    rng = np.random.default_rng(2)
    a = rng.uniform(0.5, 5.0, size=(8, 100))  # 8 layers -> candidates are layers 0..5 (600 values)
    a[1, 7], a[3, 42], a[0, 99] = 1000.0, 900.0, 800.0
    a[2, 3] = 50.0  # above the background, but below the interpolated 99.5th percentile and max/10
    a[7, 0] = 5000.0  # in the last 25% of layers: never a candidate, and not in the statistics
    # percentile position 0.995 * 599 = 596.005 -> between the 4th largest (50) and 800: ~53.75;
    # max/10 = 100.  Super: the three planted ones, by decreasing value.
    assert detect_super_experts(a) == [(1, 7), (3, 42), (0, 99)]
    # with the statistics over all layers, max/10 = 500: 900 and 800 still pass, 1000 too
    assert detect_super_experts(a, stats_over_all_layers=True) == [(1, 7), (3, 42), (0, 99)]
    assert detect_super_experts(a, rel=0.95) == [(1, 7)]
    assert detect_super_experts(np.ones((4, 8))) == []  # nothing strictly above a flat percentile
