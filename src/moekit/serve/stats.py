"""Statistics of the offload engine: counters, the decode request record, and the replay of that record through
Belady's MIN in ``moekit.analysis.cache`` (the one cache simulator) for the misses-to-optimum ratio."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from moekit.analysis.cache import simulate_cache
from moekit.serve.cache import LayerCache, LayerStats

TRACE_LIMIT = 200_000  # decode steps per layer kept for the Belady replay


class RequestLog:
    """One layer's decode requests as a growing ``[steps, width]`` int32 array (-1 pads), for the replay."""

    def __init__(self, limit: int = TRACE_LIMIT) -> None:
        self.limit = limit
        self.rows = np.full((64, 1), -1, dtype=np.int32)
        self.n = 0

    def append(self, experts: list[int]) -> None:
        if self.n >= self.limit:
            return
        width = max(self.rows.shape[1], len(experts))
        if self.n == self.rows.shape[0] or width > self.rows.shape[1]:
            n_rows = 2 * self.rows.shape[0] if self.n == self.rows.shape[0] else self.rows.shape[0]
            grown = np.full((n_rows, width), -1, dtype=np.int32)
            grown[: self.n, : self.rows.shape[1]] = self.rows[: self.n]
            self.rows = grown
        self.rows[self.n, : len(experts)] = experts
        self.n += 1

    def array(self) -> np.ndarray:
        return self.rows[: self.n]


class EngineCounters:
    """Engine-wide counters (the per-layer ones live in each ``LayerCache.stats``); updated under ``lock``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bytes_read = 0
        self.decode_bytes_read = 0
        self.stall_s = 0.0
        self.prefetch_skipped = 0
        self.pred_hits = 0
        self.pred_requests = 0
        self.pred_total = 0
        self.prefill_tokens = self.decode_tokens = 0
        self.prefill_s = self.decode_s = 0.0
        self.zero_copy = self.decode_zero_copy = 0
        self.zero_copy_bytes = 0

    def read(self, n: int, decode: bool) -> None:
        with self.lock:
            self.bytes_read += n
            if decode:
                self.decode_bytes_read += n

    def mapped(self, nbytes: int, experts: int, decode: bool) -> None:
        """``experts`` misses computed in place from the page cache (``nbytes``, not copied)."""
        with self.lock:
            self.zero_copy += experts
            self.decode_zero_copy += experts if decode else 0
            self.zero_copy_bytes += nbytes

    def stall(self, dt: float) -> None:
        with self.lock:
            self.stall_s += dt


def totals(layers: dict[int, LayerCache]) -> LayerStats:
    tot = LayerStats()
    for lc in layers.values():
        for f in vars(tot):
            setattr(tot, f, getattr(tot, f) + getattr(lc.stats, f))
    return tot


def summary(engine: Any, belady: bool = True) -> dict[str, Any]:
    """Hit rate, misses, bytes per token, prefetch precision/recall, stall time, tokens/s, and (``belady``) the
    decode misses relative to Belady's MIN on the same requests."""
    c: EngineCounters = engine.counters
    tot = totals(engine.layers)
    out: dict[str, Any] = {
        "policy": engine.policy_name, "slots_per_layer": engine.slots,
        "layer_slots": [lc.slots for lc in engine.layers.values()], "moe_layers": len(engine.layers),
        "cache_bytes": sum(lc.nbytes() for lc in engine.layers.values()), "budget_bytes": engine.budget_bytes,
        "expert_bytes": max(engine.store.expert_bytes.values()), "device": str(engine.device),
        "requests": tot.requests, "hits": tot.hits, "misses": tot.misses,
        "hit_rate": tot.hits / tot.requests if tot.requests else None,
        "late_prefetch_hits": tot.late_prefetch,
        "decode_requests": tot.decode_requests, "decode_hits": tot.decode_hits,
        "decode_misses": tot.decode_misses,
        "decode_hit_rate": tot.decode_hits / tot.decode_requests if tot.decode_requests else None,
        "fetches": tot.misses + tot.prefetch_issued,
        "bytes_read": c.bytes_read,
        "bytes_read_per_token": c.decode_bytes_read / c.decode_tokens if c.decode_tokens else None,
        "zero_copy_misses": c.zero_copy, "decode_zero_copy_misses": c.decode_zero_copy,
        "zero_copy_bytes": c.zero_copy_bytes,
        "stall_s": round(c.stall_s, 4),
        "prefill_tokens": c.prefill_tokens, "decode_tokens": c.decode_tokens,
        "prefill_s": round(c.prefill_s, 4), "decode_s": round(c.decode_s, 4),
        "tokens_per_s": c.decode_tokens / c.decode_s if c.decode_s else None,
    }
    if engine.prefetch:
        out["prefetch"] = {
            "issued": tot.prefetch_issued, "used": tot.prefetch_used, "wasted": tot.prefetch_wasted,
            "skipped": c.prefetch_skipped,
            "precision": tot.prefetch_used / tot.prefetch_issued if tot.prefetch_issued else None,
            "predictor_recall": c.pred_hits / c.pred_requests if c.pred_requests else None,
            "predictor_precision": c.pred_hits / c.pred_total if c.pred_total else None,
        }
    if belady and any(lc.slots for lc in engine.layers.values()) and tot.decode_requests:
        out["belady"] = belady_comparison(engine.layers, engine.logs, engine.warm_state)
    return out


def replay_misses(requests: np.ndarray, capacity: int, num_experts: int, initial: set[int] | None = None,
                  policy: str = "belady") -> int:
    """Misses of ``policy`` (``moekit.analysis.cache``) on one layer's recorded requests ``[steps, width]``; a
    step wider than the cache is replayed with ``belady_bypass`` (no co-residency), still a lower bound."""
    if requests.size == 0:
        return 0
    width = int((requests >= 0).sum(axis=1).max())
    if policy == "belady" and width > capacity:
        policy = "belady_bypass"
    return simulate_cache(requests, policy, capacity, num_experts=num_experts, initial=initial)["misses"]


def belady_comparison(layers: dict[int, LayerCache], logs: dict[int, RequestLog],
                      warm_state: dict[int, set[int]]) -> dict[str, Any]:
    """Replay each layer's decode requests through Belady's MIN with that layer's slots: warm (from the cache's
    contents at the first decode step, as the run) and cold (empty cache); plus LRU cold for reference."""
    warm = cold_b = cold_l = 0
    for li, lc in layers.items():
        reqs = logs[li].array()
        if not reqs.size or not lc.slots:
            continue
        num_experts = lc.policy.num_experts
        warm += replay_misses(reqs, lc.slots, num_experts, warm_state.get(li, set()))
        cold_b += replay_misses(reqs, lc.slots, num_experts)
        cold_l += replay_misses(reqs, lc.slots, num_experts, policy="lru") if (
            (reqs >= 0).sum(axis=1).max() <= lc.slots) else 0
    tot = totals(layers)
    fetches = tot.decode_misses + tot.prefetch_issued  # prefetch reads also move bytes
    return {"decode_misses": tot.decode_misses, "belady_misses_warm": warm,
            "miss_ratio_to_belady": tot.decode_misses / warm if warm else None,
            "decode_fetches": fetches, "fetch_ratio_to_belady": fetches / warm if warm else None,
            "belady_misses_cold": cold_b, "simulated_lru_misses_cold": cold_l}
