"""Cache simulation: hand-worked streams, reference implementations and exhaustive search."""

from __future__ import annotations

import functools
import itertools
from collections import OrderedDict

import numpy as np
import pytest

from moekit.analysis import cache_curves, capacities_for, next_use, simulate_cache
from moekit.errors import MoekitError


def _hits(stream, policy, cap, e=None):
    return simulate_cache(np.asarray(stream), policy, cap, num_experts=e)["hits"]


# ------------------------------------------------------------------------------------ references
def ref_lru(stream, cap):
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for row in stream:
        req = [int(x) for x in row if x >= 0]
        hits += sum(x in cache for x in req)
        for x in req:
            cache.pop(x, None)
            cache[x] = None
        for y in list(cache):
            if len(cache) <= cap:
                break
            if y not in req:
                del cache[y]
    return hits


def ref_lfu(stream, cap):
    cache, count, last, hits, clock = set(), {}, {}, 0, 0
    for row in stream:
        req = [int(x) for x in row if x >= 0]
        hits += sum(x in cache for x in req)
        for x in req:
            clock += 1
            count[x] = count.get(x, 0) + 1
            last[x] = clock
            cache.add(x)
        while len(cache) > cap:
            victim = min((y for y in cache if y not in req), key=lambda y: (count[y], last[y]))
            cache.remove(victim)
    return hits


def ref_static(stream, cap, n_items):
    flat = [int(x) for row in stream for x in row if x >= 0]
    cnt = np.bincount(flat, minlength=n_items)
    pinned = set(sorted(range(n_items), key=lambda e: (-cnt[e], e))[:cap])
    seen, hits = set(), 0
    for x in flat:
        if x in pinned:
            hits += x in seen
            seen.add(x)
    return hits


def opt_exhaustive(stream, cap, bypass, initial=frozenset()):
    """Fewest misses over every legal schedule (all choices of what to keep after each token), from ``initial``."""
    reqs = [frozenset(int(x) for x in row if x >= 0) for row in stream]

    @functools.cache
    def best(t, cache):
        if t == len(reqs):
            return 0
        r = reqs[t]
        miss = len(r - cache)
        pool = cache | r
        if bypass:
            choices = itertools.combinations(sorted(pool), min(cap, len(pool)))
            nxt = [frozenset(c) for c in choices]
        else:
            rest = sorted(cache - r)
            keep = min(cap - len(r), len(rest))
            nxt = [r | frozenset(c) for c in itertools.combinations(rest, keep)]
        return miss + min(best(t + 1, c) for c in nxt)

    return best(0, frozenset(initial))


def random_stream(rng, n, k, e, hot=None):
    rows = []
    for _ in range(n):
        pool = np.arange(e) if hot is None or rng.random() < 0.3 else hot
        rows.append(rng.choice(pool, size=k, replace=False))
    return np.array(rows)


# ------------------------------------------------------------------------------------ hand-worked
def test_lru_hand_worked():
    # k=1, C=2, stream a b a c b a  (a=0 b=1 c=2)
    # a miss {a}; b miss {a,b}; a hit; c miss evicts b (LRU) -> {a,c}; b miss evicts a -> {c,b};
    # a miss evicts c -> {b,a}.  hits = 1, misses = 5.
    s = [[0], [1], [0], [2], [1], [0]]
    r = simulate_cache(np.array(s), "lru", 2)
    assert (r["hits"], r["misses"], r["requests"]) == (1, 5, 6)
    assert r["hit_rate"] == pytest.approx(1 / 6)


def test_belady_hand_worked():
    # same stream, C=2: a miss, b miss {a,b}, a hit, c: next(a)=5, next(b)=4 -> evict a {b,c};
    # b hit; a miss (c never used again, evicted).  hits 2, misses 4.
    s = [[0], [1], [0], [2], [1], [0]]
    assert _hits(s, "belady", 2) == 2
    # bypass: at c (next use never) c is not inserted -> {a,b} stays; b hit, a hit: hits 3.
    assert _hits(s, "belady_bypass", 2) == 3


def test_lfu_and_static_hand_worked():
    # k=1, C=2, stream a a b c b a:
    # LFU: a miss, a hit, b miss {a:2,b:1}, c miss evicts b -> {a,c}, b miss evicts c (count 1, older
    # than... c count 1 at t3, b count 1 at t2 but b is requested) -> evict c -> {a,b}; a hit. hits 2.
    s = [[0], [0], [1], [2], [1], [0]]
    assert _hits(s, "lfu", 2) == 2
    # static top-2 by count: a (3), b (2); first uses are misses: a: miss hit hit -> 2, b: miss hit -> 1.
    assert _hits(s, "static", 2) == 3


def test_co_residency_with_k2():
    # k=2, C=2: tokens {0,1} {2,0} {1,2}; each token evicts everything not requested.
    # t0: 2 misses; t1: 0 hit, 2 miss (evict 1); t2: 1 miss, 2 hit.  hits = 2 for every demand policy.
    s = [[0, 1], [2, 0], [1, 2]]
    for pol in ("lru", "lfu", "belady"):
        assert _hits(s, pol, 2) == 2
    # bypass may keep {0,1} after t1 instead of {2,0}?  after t1 pool {0,1,2}, next uses: 1 and 2 at
    # t2, 0 never -> keep {1,2}; t2: two hits.  hits = 3.
    assert _hits(s, "belady_bypass", 2) == 3


def test_next_use():
    s = np.array([[0, 1], [1, -1], [0, 2]])
    assert next_use(s).tolist() == [[2, 1], [3, 3], [3, 3]]


def test_capacities_for():
    assert capacities_for(8) == [8, 12, 16, 24, 32]
    assert capacities_for(1) == [1, 1, 2, 3, 4]
    assert capacities_for(3) == [3, 4, 6, 9, 12]


def test_capacity_below_k_is_an_error():
    with pytest.raises(MoekitError):
        simulate_cache(np.array([[0, 1]]), "lru", 1)


# ------------------------------------------------------------------------------------ brute force
@pytest.mark.parametrize("k", [1, 2])
def test_belady_is_optimal_exhaustive(k):
    rng = np.random.default_rng(10 + k)
    for _ in range(60):
        n_tok = 12 // k
        e = int(rng.integers(k + 1, 6))
        s = random_stream(rng, n_tok, k, e)
        cap = 2 if k == 1 else int(rng.choice([2, 3]))
        opt = opt_exhaustive(tuple(map(tuple, s)), cap, bypass=False)
        assert s.size - _hits(s, "belady", cap, e) == opt
        optb = opt_exhaustive(tuple(map(tuple, s)), cap, bypass=True)
        assert s.size - _hits(s, "belady_bypass", cap, e) == optb
        assert optb <= opt


def test_policies_match_references_and_bounds():
    rng = np.random.default_rng(1)
    for trial in range(40):
        k = int(rng.integers(1, 4))
        e = int(rng.integers(k + 1, 12))
        n = int(rng.integers(1, 60))
        s = random_stream(rng, n, k, e, hot=rng.choice(e, size=min(e, k + 2), replace=False))
        for cap in sorted({k, k + 1, 2 * k, e}):
            lru, lfu = _hits(s, "lru", cap, e), _hits(s, "lfu", cap, e)
            st, bel, byp = _hits(s, "static", cap, e), _hits(s, "belady", cap, e), _hits(s, "belady_bypass", cap, e)
            assert lru == ref_lru(s, cap), (trial, cap)
            assert lfu == ref_lfu(s, cap), (trial, cap)
            assert st == ref_static(s, cap, e), (trial, cap)
            assert bel >= max(lru, lfu)  # Belady has the fewest misses of the demand policies
            assert byp >= max(bel, st)  # bypass OPT is a lower bound on misses for all of them


def test_cache_curves_layer_and_global():
    class T:
        pass

    rng = np.random.default_rng(3)
    tr = T()
    tr.ids = np.stack([random_stream(rng, 40, 2, 6, hot=np.array([0, 1, 2])) for _ in range(3)])
    tr.num_experts = [6, 6, 6]
    tr.top_k = [2, 2, 2]
    out = cache_curves(tr)
    assert out["capacities"] == [2, 3, 4, 6, 8]
    for li in range(3):  # per-layer numbers equal independent single-stream runs
        for ci, c in enumerate(out["capacities"]):
            assert out["layer"]["per_layer_hit_rate"]["lru"][li][ci] == pytest.approx(ref_lru(tr.ids[li], c) / 80)
    tot_lru = sum(ref_lru(tr.ids[li], 4) for li in range(3))
    assert out["layer"]["lru"]["hits"][2] == tot_lru
    # global: keys (layer, e) -> layer * 6 + e, one request per token with all layers, C * L slots
    glob = np.concatenate([tr.ids[li] + 6 * li for li in range(3)], axis=1)
    for ci, c in enumerate(out["global"]["capacities"]):
        assert out["global"]["lru"]["hits"][ci] == ref_lru(glob, c)
        assert out["global"]["belady"]["miss_ratio_to_belady"][ci] == 1.0
    for scope in ("layer", "global"):
        for pol in ("lru", "lfu"):
            assert all(r >= 1.0 for r in out[scope][pol]["miss_ratio_to_belady"])
        # static never inserts a miss, so only the bypass optimum bounds it
        byp = out[scope]["belady_bypass"]["misses"]
        assert all(s >= b for s, b in zip(out[scope]["static"]["misses"], byp, strict=True))
        assert all(r <= 1.0 for r in out[scope]["belady_bypass"]["miss_ratio_to_belady"])


def test_static_profile_from_another_split():
    class T:
        pass

    ev, pr = T(), T()
    # profile says experts 2,3 are hot; the evaluated stream uses 0 and 2 -> only 2 is pinned (C=2)
    pr.ids = np.array([[[2], [3], [2], [3]]])
    ev.ids = np.array([[[0], [2], [0], [2]]])
    for t in (ev, pr):
        t.num_experts, t.top_k = [4], [1]
    out = cache_curves(ev, multipliers=(2,), policies=("static",), scopes=("layer",), profile=pr)
    assert out["layer"]["static"]["hits"] == [1]  # 2: miss then hit; 0 is never cached
    assert cache_curves(ev, multipliers=(2,), policies=("static",), scopes=("layer",))["layer"]["static"]["hits"] == [2]


def test_lru_closed_form_and_simulation_agree():
    from moekit.analysis.cache import _lru_hits, _simulate

    rng = np.random.default_rng(7)
    for _ in range(15):
        k, e = int(rng.integers(1, 4)), int(rng.integers(4, 10))
        s = random_stream(rng, int(rng.integers(1, 50)), k, e, hot=rng.choice(e, size=k + 1, replace=False))
        caps = sorted({k, k + 1, 2 * k, e})
        sim = _simulate(s[None], e, ["lru"], caps)[0, 0]
        assert sim.tolist() == _lru_hits(s, e, caps).tolist() == [ref_lru(s, c) for c in caps]


def test_next_use_matches_loops():
    rng = np.random.default_rng(8)
    for _ in range(100):
        n, k, e = int(rng.integers(1, 25)), int(rng.integers(1, 4)), int(rng.integers(1, 6))
        s = rng.integers(-1, e, size=(n, k))  # repeats within a token allowed here
        ref = np.full((n, k), n)
        for t in range(n):
            for j in range(k):
                if s[t, j] >= 0:
                    ref[t, j] = next((u for u in range(t + 1, n) if s[t, j] in s[u]), n)
        assert (next_use(s) == ref).all()


def test_warm_start_hand_worked_and_optimal():
    """The offload engine's replay: Belady from the cache it held when decoding began. C=3 from {0, 1, 4}:
    t0 hits; t1 [2,3] evicts 4 and 1 (next uses t3, tie to the larger id first); t3 [1,4] evicts 2 (t5) and 3
    (t4, tie with 0); t4 [0,3] evicts 4; t5 [2,1] evicts 3 (never again); t6 [4,0]: 2+2+1+1+1 = 7 (cold: 9)."""
    reqs = np.array([[0, 1], [2, 3], [0, 2], [1, 4], [0, 3], [2, 1], [4, 0]])
    assert simulate_cache(reqs, "belady", 3, num_experts=8, initial=[0, 1, 4])["misses"] == 7
    assert simulate_cache(reqs, "belady", 3, num_experts=8)["misses"] == 9
    # LRU from {5, 6, 7}: the warm items are older than any request, so they go first and nothing changes
    assert simulate_cache(reqs, "lru", 3, num_experts=8, initial=[5, 6, 7])["misses"] == 13
    assert simulate_cache(reqs, "lru", 3, num_experts=8, initial=[0, 1])["misses"] == 11
    with pytest.raises(MoekitError, match="does not fit"):
        simulate_cache(reqs, "belady", 2, num_experts=8, initial=[0, 1, 4])
    rng = np.random.default_rng(21)
    for _ in range(40):
        s = random_stream(rng, 6, 2, 5)
        init = frozenset(int(x) for x in rng.choice(5, size=int(rng.integers(0, 4)), replace=False))
        for bypass, pol in ((False, "belady"), (True, "belady_bypass")):
            got = simulate_cache(s, pol, 3, num_experts=5, initial=sorted(init))["misses"]
            assert got == opt_exhaustive(tuple(map(tuple, s)), 3, bypass, init)
