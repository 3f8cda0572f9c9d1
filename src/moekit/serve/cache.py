"""Expert cache policies (registry) and the per-layer slot bank in the fast tier.

A policy only does bookkeeping for one layer's cache: which experts to admit and which resident one
to evict.  The engine (``moekit.serve.engine``) owns the data, the locking and the statistics.

* ``lru``: evict the least recently used expert.
* ``lfu``: evict the expert with the fewest requests so far (counts persist across evictions), ties to LRU.
* ``static``: pin the top-C experts by frequency in a profile (a routing trace or per-layer counts);
  nothing else is ever cached (a miss outside the pinned set is read and used, not inserted).
  Without a profile, the first C distinct experts requested are pinned.
* ``lru+prefetch`` (default): LRU plus cross-layer-gate prefetch: layer l+1's router applied to layer
  l's router input predicts layer l+1's experts, fetched on a background thread (Fate, mixtral-offloading).
* ``none``: no cache; every requested expert is read on demand.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from moekit.registry import Registry


class Policy:
    """Admission and eviction for one layer's cache of ``capacity`` experts."""

    prefetch: bool = False

    def __init__(self, capacity: int, num_experts: int, profile: np.ndarray | None = None) -> None:
        self.capacity = capacity
        self.num_experts = num_experts
        self._tick = itertools.count()
        self.recency: OrderedDict[int, int] = OrderedDict()  # resident experts, least recent first

    def admit(self, expert: int) -> bool:
        """Whether a missed expert may be inserted."""
        return self.capacity > 0

    def touch(self, expert: int) -> None:
        """A request (hit) or a prediction for a resident expert."""
        if expert in self.recency:
            self.recency.move_to_end(expert)

    def insert(self, expert: int) -> None:
        self.recency[expert] = next(self._tick)
        self.recency.move_to_end(expert)

    def request(self, expert: int) -> None:
        """Every request, hit or miss (frequency policies count here)."""

    def evict(self, expert: int) -> None:
        self.recency.pop(expert, None)

    def victim(self, candidates: Iterable[int]) -> int | None:
        """The resident expert to evict among ``candidates`` (resident, not in use), or None."""
        allowed = set(candidates)
        return next((e for e in self.recency if e in allowed), None)


POLICIES: Registry[type[Policy]] = Registry("offload policy")


@POLICIES.register("lru")
class LRU(Policy):
    """Least recently used."""


@POLICIES.register("lru+prefetch")
class LRUPrefetch(LRU):
    """LRU plus cross-layer-gate prefetch on a background thread (the default)."""

    prefetch = True


@POLICIES.register("lfu")
class LFU(Policy):
    """Least frequently used (counts over the whole past), ties to the least recent."""

    def __init__(self, capacity: int, num_experts: int, profile: np.ndarray | None = None) -> None:
        super().__init__(capacity, num_experts, profile)
        self.counts = np.zeros(num_experts, dtype=np.int64)

    def request(self, expert: int) -> None:
        self.counts[expert] += 1

    def victim(self, candidates: Iterable[int]) -> int | None:
        allowed = set(candidates)
        order = {e: i for i, e in enumerate(self.recency)}
        best = [e for e in self.recency if e in allowed]
        return min(best, key=lambda e: (self.counts[e], order[e])) if best else None


@POLICIES.register("static")
class Static(Policy):
    """The top-C experts of a frequency profile are pinned; others are never cached."""

    def __init__(self, capacity: int, num_experts: int, profile: np.ndarray | None = None) -> None:
        super().__init__(capacity, num_experts, profile)
        self.pinned: set[int] = set()
        self.from_profile = profile is not None
        if profile is not None:
            counts = np.asarray(profile, dtype=np.float64)[:num_experts]
            order = np.lexsort((np.arange(len(counts)), -counts))
            self.pinned = {int(e) for e in order[:capacity]}

    def admit(self, expert: int) -> bool:
        if expert in self.pinned:
            return True
        if not self.from_profile and len(self.pinned) < self.capacity:
            self.pinned.add(expert)
            return True
        return False

    def victim(self, candidates: Iterable[int]) -> int | None:
        allowed = [e for e in candidates if e not in self.pinned]
        return super().victim(allowed)


@POLICIES.register("none")
class NoCache(Policy):
    """On demand, nothing cached."""

    def admit(self, expert: int) -> bool:
        return False


@dataclass
class LayerStats:
    """Counters of one layer's cache (decode and prefill forwards apart)."""

    requests: int = 0
    hits: int = 0
    misses: int = 0
    late_prefetch: int = 0        # requested while its prefetch was still reading (counted as hits)
    decode_requests: int = 0
    decode_hits: int = 0
    decode_misses: int = 0


class LayerCache:
    """One MoE layer's slots in the fast tier: a bank of ``slots`` experts per fused tensor."""

    def __init__(self, layer: int, slots: int, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 device: torch.device, policy: Policy) -> None:
        self.layer = layer
        self.slots = slots
        self.bank = {n: torch.empty((slots, *shape), dtype=dt, device=device) for n, (shape, dt) in shapes.items()}
        self.slot_of: dict[int, int] = {}        # resident or loading expert → slot
        self.loading: dict[int, object] = {}      # expert → threading.Event while its read is in flight
        self.free = list(range(slots - 1, -1, -1))
        self.pins: dict[int, int] = {}
        self.prefetched: set[int] = set()          # brought by prefetch, not yet requested
        self.policy = policy
        self.stats = LayerStats()
        self.forwards = 0
        self._released: int | None = None

    def weights(self, slot: int) -> dict[str, torch.Tensor]:
        return {n: t[slot] for n, t in self.bank.items()}

    def nbytes(self) -> int:
        if self._released is not None:
            return self._released
        return sum(t.numel() * t.element_size() for t in self.bank.values())

    def release_memory(self) -> None:
        """Drop the slot bank (after the engine stops); ``nbytes`` keeps reporting its size."""
        if self._released is None:
            self._released = self.nbytes()
        self.bank = {}
        self.slot_of.clear()
        self.loading.clear()
        self.free = []

    def evictable(self) -> list[int]:
        return [e for e in self.slot_of if e not in self.loading and not self.pins.get(e)]

    def resident(self) -> set[int]:
        return {e for e in self.slot_of if e not in self.loading}
