"""Domain frequency, mutual information (+ shuffled control) and nPMI."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moekit.analysis import (
    domain_frequency,
    domain_mutual_information,
    expert_token_npmi,
    shuffled_mi,
    token_class_mask,
    top_experts_per_domain,
)
from moekit.errors import MoekitError


def loop_mi(ids, domain):
    """Plug-in MI with explicit loops over (token, slot) samples."""
    joint, n = {}, 0
    for t in range(len(ids)):
        if domain[t] < 0:
            continue
        for x in ids[t]:
            if x < 0:
                continue
            joint[(int(domain[t]), int(x))] = joint.get((int(domain[t]), int(x)), 0) + 1
            n += 1
    pd, pe = {}, {}
    for (d, e), c in joint.items():
        pd[d] = pd.get(d, 0) + c
        pe[e] = pe.get(e, 0) + c
    return sum(c / n * math.log((c / n) / ((pd[d] / n) * (pe[e] / n))) for (d, e), c in joint.items())


def test_mi_hand_worked():
    # domain 0 tokens pick expert 0, domain 1 tokens pick expert 1, equally often: MI = ln 2 = 1 bit
    ids = np.array([[0], [0], [1], [1]])
    r = domain_mutual_information(ids, np.array([0, 0, 1, 1]), 2)
    assert r["mi_nats"] == pytest.approx(math.log(2))
    assert r["mi_bits"] == pytest.approx(1.0)
    assert r["mi_norm"] == pytest.approx(1.0)
    # independent: both domains split evenly over experts 0 and 1 -> MI = 0
    r0 = domain_mutual_information(np.array([[0], [1], [0], [1]]), np.array([0, 0, 1, 1]), 2)
    assert r0["mi_nats"] == pytest.approx(0.0, abs=1e-12)


def test_mi_matches_loops():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n, e, k, dn = int(rng.integers(1, 60)), int(rng.integers(2, 8)), int(rng.integers(1, 3)), int(rng.integers(1, 4))
        ids = rng.integers(-1, e, size=(n, k))
        dom = rng.integers(-1, dn, size=n)
        if not ((ids >= 0) & (dom[:, None] >= 0)).any():
            continue
        assert domain_mutual_information(ids, dom, e)["mi_nats"] == pytest.approx(loop_mi(ids, dom), abs=1e-12)


def test_mi_of_deterministic_routing_is_domain_entropy():
    rng = np.random.default_rng(1)
    dom = rng.integers(0, 4, size=5000)
    table = np.array([[0, 1], [2, 3], [4, 5], [6, 7]])  # each domain its own pair of experts
    r = domain_mutual_information(table[dom], dom, 8)
    p = np.bincount(dom) / dom.size
    assert r["mi_nats"] == pytest.approx(float(-(p * np.log(p)).sum()), abs=1e-12)
    assert r["mi_norm"] == pytest.approx(1.0)


def test_shuffled_mi_is_about_zero():
    rng = np.random.default_rng(2)
    n, e = 200_000, 16
    dom = rng.integers(0, 5, size=n)
    pref = rng.dirichlet(np.ones(e) * 0.3, size=5)  # strongly domain-dependent routing
    u = rng.random((n, 1))
    ids = np.concatenate([(pref[dom].cumsum(axis=1) < u).sum(axis=1, keepdims=True),
                          rng.integers(0, e, size=(n, 1))], axis=1)
    ids = np.minimum(ids, e - 1)
    real = domain_mutual_information(ids, dom, e)["mi_nats"]
    ctrl = shuffled_mi(ids, dom, e, seed=0)["mi_nats"]
    assert real > 0.1
    assert ctrl < 1e-3  # plug-in bias ~ (D-1)(E-1) / (2 n) = 1.5e-4


def test_domain_frequency_and_top_experts():
    ids = np.array([[0, 1], [0, 2], [3, 1], [3, -1]])
    dom = np.array([0, 0, 1, -1])
    cnt = domain_frequency(ids, dom, 4, 2, normalize=False)
    assert cnt.tolist() == [[2, 1, 1, 0], [0, 1, 0, 1]]
    f = domain_frequency(ids, dom, 4, 2)
    assert f.tolist() == [[0.5, 0.25, 0.25, 0.0], [0.0, 0.5, 0.0, 0.5]]
    top = top_experts_per_domain(f, n=2, by="frequency", domains=["a", "b"])
    assert top[0]["domain"] == "a" and top[0]["experts"] == [0, 1]
    assert top[1]["experts"] == [1, 3]
    # lift: mean over domains [.25,.375,.125,.25]; domain a: [2, .667, 2, 0] -> experts 0, 2
    assert top_experts_per_domain(f, n=2)[0]["experts"] == [0, 2]


def test_npmi_hand_worked():
    ids = np.array([[0], [0], [1], [1]])
    # class = tokens 0,1: e0: p(e,t)=.5 p(e)=.5 p(t)=.5 -> log 2 / -log .5 = 1 ; e1 never -> -1
    assert expert_token_npmi(ids, np.array([True, True, False, False]), 2).tolist() == [1.0, -1.0]
    # class = tokens 0,2: e0: p(e,t)=.25 = p(e)p(t) -> 0 ; same for e1
    assert expert_token_npmi(ids, np.array([True, False, True, False]), 2) == pytest.approx([0.0, 0.0])
    # class = tokens 0,1,2: e0: p(e,t)=.5, p(e)=.5, p(t)=.75: log(.5/.375)/-log(.5) = .415037
    v = expert_token_npmi(ids, np.array([True, True, True, False]), 2)
    assert v[0] == pytest.approx(math.log(0.5 / 0.375) / math.log(2))
    # every token in the class and selecting e0: p(e,t) = 1 -> +1 by convention
    assert expert_token_npmi(np.array([[0], [0]]), np.array([True, True]), 2).tolist() == [1.0, -1.0]


def test_npmi_matches_formula_loop():
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 6, size=(300, 2))
    mask = rng.random(300) < 0.3
    got = expert_token_npmi(ids, mask, 6)
    n = len(ids)
    for e in range(6):
        sel = np.array([e in set(r.tolist()) for r in ids])
        pet, pe, pt = (sel & mask).sum() / n, sel.sum() / n, mask.sum() / n
        want = -1.0 if pet == 0 else math.log(pet / (pe * pt)) / -math.log(pet)
        assert got[e] == pytest.approx(want)


def test_token_class_mask():
    vocab = {0: "Hello", 1: " world", 2: "<think>", 3: "123", 4: "x"}
    tok = np.array([0, 1, 2, 3, 2, 4])
    assert token_class_mask(tok, class_ids=[2]).tolist() == [False, False, True, False, True, False]
    m = token_class_mask(tok, regex=r"^\d+$", decode=vocab.__getitem__)
    assert m.tolist() == [False, False, False, True, False, False]
    both = token_class_mask(tok, class_ids=[0], regex="think", decode=vocab.__getitem__)
    assert both.tolist() == [True, False, True, False, True, False]
    with pytest.raises(MoekitError):
        token_class_mask(tok, regex="x")
    with pytest.raises(MoekitError):
        token_class_mask(tok)
