"""The expert cache without threads: the slot state machine step by step, and each eviction policy's exact misses
on hand-made request sequences (computed by hand in the docstrings)."""

from __future__ import annotations

import pytest
import torch

from moekit.errors import MoekitError
from moekit.serve import POLICIES, TensorStore, offload
from moekit.serve.cache import LFRU, LayerCache, shallow_favouring
from moekit.testing import tiny_lm

SHAPES = {"w": ((2, 3), torch.float32)}


def _cache(policy: str, slots: int, num_experts: int = 8, **kw) -> LayerCache:
    return LayerCache(0, slots, SHAPES, torch.device("cpu"), POLICIES.get(policy)(slots, num_experts, **kw))


def _run(lc: LayerCache, requests: list[list[int]]) -> int:
    """The engine's protocol for one forward per step (lookup, claim + finish each miss, release); returns misses."""
    for req in requests:
        plan = lc.lookup(req, decode=True)
        for e in req:
            if plan[e] == "miss" and lc.claim(e) is not None:
                lc.finish(e)
        lc.release(req, req)
    return lc.stats.misses


def test_slot_state_machine_sequence():
    lc = _cache("lru", 2)
    assert lc.claim(0, "t0") == 0 and lc.state(0) == "loading" and lc.pins == {0: 1}
    assert lc.evictable() == [] and lc.resident() == set()
    assert lc.finish(0) == "t0" and lc.state(0) == "resident"
    lc.release([0], [0])
    assert lc.pins == {} and lc.evictable() == [0]
    assert lc.claim(1) == 1 and lc.finish(1) is None
    lc.release([1], [1])
    assert lc.free == []
    # full: claiming 2 evicts the least recent resident (0) and reuses its slot
    assert lc.claim(2, "t2") == 0 and lc.state(0) == "absent" and lc.slot_of == {1: 1, 2: 0}
    # 1 pinned by a forward's lookup, 2 loading: nothing may be evicted
    assert lc.lookup([1, 5], decode=True) == {1: "hit", 5: "miss"}
    assert lc.claim(5) is None
    # a failed read frees the slot and drops the pin
    assert lc.finish(2, ok=False) == "t2"
    assert lc.state(2) == "absent" and lc.free == [0] and 2 not in lc.pins
    assert lc.claim(5) == 0
    with pytest.raises(MoekitError, match="already loading"):
        lc.claim(5)
    lc.finish(5)
    lc.release([1, 5], [1, 5])
    assert lc.resident() == {1, 5} and lc.pins == {}
    s = lc.stats
    assert (s.requests, s.hits, s.misses, s.decode_requests) == (2, 1, 1, 2)


def test_slot_table_maps_resident_experts_only():
    """``table`` (what a native decode step reads): expert → slot once resident; -1 while loading, after an eviction,
    a failed read and when the bank is released."""
    lc = _cache("lru", 2, num_experts=4)

    def table() -> list[int]:
        return lc.table.tolist()

    assert table() == [-1] * 4
    lc.claim(1)
    assert table() == [-1] * 4  # loading
    lc.finish(1)
    lc.claim(3)
    lc.finish(3)
    lc.release([1, 3], [1, 3])
    assert table() == [-1, 0, -1, 1]
    lc.claim(2)  # evicts 1 (least recent), loads into its slot
    assert table() == [-1, -1, -1, 1]
    lc.finish(2, ok=False)
    assert table() == [-1, -1, -1, 1] and lc.free == [0]
    lc.claim(0)
    lc.finish(0)
    assert table() == [0, -1, -1, 1] == [lc.slot_of.get(e, -1) for e in range(4)]
    lc.release_memory()
    assert table() == [-1] * 4


def test_prefetch_claims_keep_predictions_and_count_waste():
    lc = _cache("lru+prefetch", 2)
    _run(lc, [[0], [1]])
    # a prefetch of 3 may not evict 0, which the same prediction wants: it evicts 1
    assert lc.claim(3, pin=False, keep={0, 3}, prefetch=True) == 1
    lc.finish(3)
    assert lc.prefetched == {3} and lc.stats.prefetch_issued == 1 and lc.pins == {}
    # 4 evicts 0 (recency 0, 3); then 0 evicts 3, never requested: a wasted prefetch
    _run(lc, [[4]])
    assert lc.resident() == {3, 4} and lc.stats.prefetch_wasted == 0
    _run(lc, [[0]])
    assert lc.resident() == {0, 4} and lc.stats.prefetch_wasted == 1 and lc.stats.prefetch_used == 0


def test_lru_lfu_lfru_exact_misses():
    """Two slots, one expert per step: 0 0 1 0 2 1 2 1.

    LRU: misses at 0, 1, 2 (evicts 1), 1 (evicts 0), then 2 and 1 hit: 4.
    LFU (0's count 3 keeps it): 0, 1, 2 (evicts 1: count 1), 1 (evicts 2: 1 < 3), 2 (evicts 1: 2 < 3), 1 (evicts 2): 6.
    LFRU, decay 0.8 (score = sum over requests of 0.8^age in steps; scores persist after eviction):
    step 5 evicts 1 (0: 2.152 * .8 = 1.72 > 1: .8^2 = .64); step 6 evicts 2 (0: 1.38 > 2: .8);
    step 7 (2's score 1.64) evicts 0 (0: 1.10 < 1: 1.512 * .8 = 1.21); step 8 hits: 0, 1, 2, 1, 2 = 5."""
    reqs = [[e] for e in (0, 0, 1, 0, 2, 1, 2, 1)]
    assert _run(_cache("lru", 2), reqs) == 4
    assert _run(_cache("lfu", 2), reqs) == 6
    lfru = _cache("lfru", 2, decay=0.8)
    assert _run(lfru, reqs) == 5
    assert lfru.resident() == {1, 2}
    assert lfru.policy.value(2) == pytest.approx((0.8**2 + 1) * 0.8)
    assert lfru.policy.value(0) == pytest.approx((1.8 * 0.8**2 + 1) * 0.8**4)


def test_lfru_default_half_life_and_limits():
    assert LFRU(2, 8).decay == pytest.approx(0.5 ** (1 / LFRU.HALF_LIFE))
    reqs = [[e] for e in (0, 0, 1, 0, 2, 1, 2, 1)]
    assert _run(_cache("lfru", 2, decay=1.0), reqs) == 6   # no decay: LFU
    assert _run(_cache("lfru", 2, decay=0.5), reqs) == 4   # 0.5^a > sum of all older terms: LRU


def test_fate_splits_slots_toward_shallow_layers():
    """Weights 2, 5/3, 4/3, 1 over 16 slots with 2 each first: shares of the other 8 are 2.67, 2.22, 1.78, 1.33,
    floors 2, 2, 1, 1 and the two largest remainders (.78, .67) get one more: 5, 4, 4, 3."""
    assert shallow_favouring(16, 4, 2, 8) == [5, 4, 4, 3]
    assert shallow_favouring(12, 2, 2, 8) == [7, 5]
    assert shallow_favouring(12, 2, 2, 6) == [6, 6]   # the cap sends the rest to the deeper layer
    assert POLICIES.get("fate").layer_capacities(4, 4, 8, 2) == [5, 4, 4, 3]
    assert POLICIES.get("lru").layer_capacities(4, 4, 8, 2) == [4, 4, 4, 4]
    lm = tiny_lm("qwen3_moe")  # two MoE layers, E=8, k=2
    with offload(lm, policy="fate", slots=4, store=TensorStore.from_model(lm)) as engine:
        # 2 each, then the 4 spare slots 2:1: shares 2.67, 1.33, and the larger remainder (.67) gets the last one
        assert [lc.slots for lc in engine.layers.values()] == [5, 3]
        assert engine.stats()["layer_slots"] == [5, 3]


def test_every_eviction_policy_has_a_prefetch_variant_and_help():
    names = POLICIES.names()
    for base in ("lru", "lfu", "lfru", "fate"):
        assert base in names and base + "+prefetch" in names
        assert not POLICIES.get(base).prefetch and POLICIES.get(base + "+prefetch").prefetch
        assert issubclass(POLICIES.get(base + "+prefetch"), POLICIES.get(base))
    assert all(POLICIES.get(n).help and POLICIES.help(n) == POLICIES.get(n).help for n in names)


def test_slot_banks_of_two_mib_or_more_sit_on_huge_pages():
    """A CPU slot bank of >= 2 MiB is allocated 2 MiB-aligned on pages advised for huge pages (where the system has
    them), usable like any tensor; a small bank stays a plain allocation."""
    from moekit.nn.huge_pages import huge_pages_supported, is_on_huge_page_boundary

    shapes = {"gate_up_proj": ((256, 1024), torch.bfloat16), "down_proj": ((8, 8), torch.float32)}
    lc = LayerCache(0, 4, shapes, torch.device("cpu"), POLICIES.get("lru")(4, 16))
    big, small = lc.bank["gate_up_proj"], lc.bank["down_proj"]
    assert big.shape == (4, 256, 1024) and big.dtype == torch.bfloat16 and big.is_contiguous()
    assert is_on_huge_page_boundary(big) == huge_pages_supported()
    assert small.shape == (4, 8, 8) and small.dtype == torch.float32
    big[2].fill_(1.5)
    assert torch.equal(lc._views[2]["gate_up_proj"], torch.full((256, 1024), 1.5, dtype=torch.bfloat16))
    if huge_pages_supported():
        assert big[1].abs().sum() == 0  # fresh anonymous memory reads as zeros
