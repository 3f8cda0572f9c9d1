"""SRP and SCH (moe-lrc definitions): hand-worked examples, every-tau enumeration, naive SCH."""

from __future__ import annotations

import numpy as np
import pytest

from moekit.analysis import sch, sch_layers, sch_model, segment_count_histogram, srp, srp_layers


# ------------------------------------------------------------------------------------------- SRP
def test_srp_hand_worked():
    # L_s = 2, one document, k = 1: tokens [0], [0], [1].  Windows (0,1): c0=2 c1=0; (1,2): c0=1 c1=1.
    # a = 4.  tau=0: m=4 p=2*4=8 F1=8/12; tau=1: m=4 p=2*3=6 F1=8/10=0.8; tau=2: m=2 p=2 F1=4/6.
    # best tau = 1, SRP = 0.8, p/a = 6/4 = 1.5, activation rate a / p(0) = 4/8 = 0.5.
    ids = np.array([[0], [0], [1]])
    r = srp(ids, np.zeros(3, dtype=int), 2, seg_lens=(2,))[2]
    assert r["srp"] == pytest.approx(0.8)
    assert (r["tau"], r["m"], r["p"], r["a"], r["n_pairs"]) == (1, 4, 6, 4, 4)
    assert r["p_over_a"] == pytest.approx(1.5)
    assert r["act_rate"] == pytest.approx(0.5)


def test_srp_windows_never_cross_documents():
    # two documents [0],[0] | [1],[1] with L_s = 2: only windows (0,1) and (2,3); the straddling one
    # (1,2) is not counted.  Pairs: c0=2,c1=0 ; c0=0,c1=2, a = 4.  tau=1: m=4, p=2*2=4, F1=8/8=1
    # (tau=2 gives the same; the first best tau is reported).
    ids = np.array([[0], [0], [1], [1]])
    r = srp(ids, np.array([0, 0, 1, 1]), 2, seg_lens=(2,))[2]
    assert r["n_pairs"] == 4 and r["srp"] == pytest.approx(1.0) and r["tau"] == 1
    # a document shorter than L_s has no window at all
    assert srp(ids, np.array([0, 0, 1, 1]), 2, seg_lens=(3,))[3]["n_pairs"] == 0


def brute_srp(ids, doc, e, sl):
    """Every window, every expert, every tau with plain loops."""
    n = len(ids)
    counts = []
    for s in range(n - sl + 1):
        if doc[s] != doc[s + sl - 1]:
            continue
        for x in range(e):
            counts.append(sum(1 for t in range(s, s + sl) if x in set(ids[t].tolist())))
    if not counts:
        return None
    a = sum(counts)
    best = (-1.0, -1, 0.0)
    for tau in range(sl + 1):
        m = sum(c for c in counts if c >= tau)
        p = sl * sum(1 for c in counts if c >= tau)
        f1 = 2 * m / max(p + a, 1)
        if f1 > best[0]:
            best = (f1, tau, p / a if a else 0.0)
    return best


def test_srp_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(40):
        e = int(rng.integers(2, 7))
        k = int(rng.integers(1, e + 1))
        n = int(rng.integers(1, 40))
        ids = np.stack([rng.choice(e, size=k, replace=False) for _ in range(n)])
        ids[rng.random(ids.shape) < 0.1] = -1  # some empty slots
        doc = np.sort(rng.integers(0, 3, n))
        for sl in (1, 2, 4, 8):
            got = srp(ids, doc, e, seg_lens=(sl,), per_expert=True)[sl]
            ref = brute_srp(ids, doc, e, sl)
            if ref is None:
                assert got["n_pairs"] == 0
                continue
            assert got["srp"] == pytest.approx(ref[0])
            assert got["tau"] == ref[1]
            assert got["p_over_a"] == pytest.approx(ref[2])
            for x in range(e):  # expert level: its own tau
                ref_e = brute_srp(np.where(ids == x, 0, -1), doc, 1, sl)
                assert got["experts"][x]["srp"] == pytest.approx(ref_e[0])


def test_srp_layers_pools_counts():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 4, size=(2, 30, 1))
    doc = np.zeros(30, dtype=int)
    r = srp_layers(ids, doc, 4, seg_lens=(4,))
    h = segment_count_histogram(ids[0], doc, 4, 4) + segment_count_histogram(ids[1], doc, 4, 4)
    counts = np.repeat(np.arange(5), h.sum(axis=0))
    a = counts.sum()
    best = max(2 * counts[counts >= t].sum() / (4 * (counts >= t).sum() + a) for t in range(5))
    assert r["model"][0] == pytest.approx(best)
    assert r["layers"][0][0] == pytest.approx(srp(ids[0], doc, 4, (4,))[4]["srp"])


# ------------------------------------------------------------------------------------------- SCH
def naive_sch_hits(seq, seg_len, cap):
    """A direct cache of size ``cap`` per document, priorities recomputed from scratch at every
    eviction: (uses in tokens t+1 .. t+L_s-1, plus 1 if still requested later in this token, then
    last-use time).  Lookups before updates; first touches hit while fewer than cap distinct seen."""
    t_len = len(seq)
    rows = [[int(x) for x in r if x >= 0] for r in seq]
    cache, seen, last, ts, hits = set(), set(), {}, 0, 0
    for t in range(t_len):
        row = rows[t]
        uni = len(seen)
        for x in row:
            if x in seen:
                hits += x in cache
            else:
                hits += uni < cap
                uni += 1
        seen.update(row)
        for j, x in enumerate(row):
            if x not in cache:
                if len(cache) >= cap:
                    def prio(z, t=t, j=j, row=row):
                        fut = sum(z in rows[u] for u in range(t + 1, min(t + seg_len, t_len)))
                        return (fut + (z in row[j + 1 :]), last[z])
                    cache.remove(min(cache, key=prio))
                cache.add(x)
            ts += 1
            last[x] = ts
    return hits


def test_sch_hand_worked():
    # E=3, k=1, L_s=2, C=2, tokens 0 1 2 0 1.  t0, t1: first touches with 0 / 1 distinct seen < 2:
    # hits.  t2: expert 2 is new with 2 seen: miss; evict the lower of 0 (used at t3 -> 1) and
    # 1 (unused in t3 -> 0): evict 1.  t3: 0 hit.  t4: 1 miss.  3 hits of 5.  (LRU would evict 0 at
    # t2 and score 2.)  With C=1: t0 hit, t1 miss, t2 miss, t3 miss, t4 miss -> 1 of 5.
    seq = np.array([[0], [1], [2], [0], [1]])
    r = sch(seq, np.zeros(5, dtype=int), 3, 2, [1, 2, 3])
    assert r["hits"] == [1, 3, 5] and r["requests"] == 5
    assert r["hit_rate"] == pytest.approx([0.2, 0.6, 1.0])


def test_sch_matches_naive_simulation():
    rng = np.random.default_rng(2)
    for _ in range(40):
        e = int(rng.integers(2, 9))
        k = int(rng.integers(1, min(e, 3) + 1))
        t_len = int(rng.integers(1, 30))
        hot = rng.choice(e, size=min(e, k + 2), replace=False)
        seq = np.stack([rng.choice(hot if rng.random() < 0.6 else np.arange(e), size=k, replace=False)
                        for _ in range(t_len)])
        for sl in (1, 2, 4, 16):
            caps = list(range(1, e + 1))
            got = sch(seq, np.zeros(t_len, dtype=int), e, sl, caps)["hits"]
            assert got == [naive_sch_hits(seq, sl, c) for c in caps]


def test_sch_documents_are_independent_and_layers_split():
    rng = np.random.default_rng(3)
    lens = [5, 12, 1, 20]
    doc = np.repeat(np.arange(4), lens)
    ids = np.stack([np.stack([rng.choice(6, 2, replace=False) for _ in range(sum(lens))]) for _ in range(2)])
    starts = np.concatenate([[0], np.cumsum(lens)])
    for li in range(2):
        want = [sum(naive_sch_hits(ids[li][starts[d]:starts[d + 1]], 4, c) for d in range(4)) for c in (2, 4)]
        assert sch(ids[li], doc, 6, 4, [2, 4])["hits"] == want
    tab = sch_layers(ids, doc, 6, 2, seg_lens=(4,), multipliers=(1, 2))
    for li in range(2):
        r = sch(ids[li], doc, 6, 4, [2, 4])
        assert tab["hit_rate"][0][li] == pytest.approx(r["hit_rate"])
    # model level: keys (layer, e) as one request per token
    merged = np.concatenate([ids[0], ids[1] + 6], axis=1)
    assert sch_model(ids, doc, 6, 4, [4, 8])["hits"] == sch(merged, doc, 12, 4, [4, 8])["hits"]
