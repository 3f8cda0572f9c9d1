"""Expert cache: eviction policies (registry) and one layer's slot bank with its state machine.

A policy only does bookkeeping for one layer: which experts to admit and which resident one to evict
(and, for ``fate``, how many slots each layer gets).  ``LayerCache`` owns the slots and moves each one
through the only state machine of the cache::

    free --claim--> loading --finish(ok)--> resident --evict (claim of another expert)--> loading ...
                    loading --finish(failed)--> free

``pin``/``release`` bracket a forward's use of its experts (a pinned slot is never evicted).  Nothing here
locks or waits: the engine (``moekit.serve.engine``) calls these methods under its lock, and the opaque
``token`` passed to ``claim`` (a ``threading.Event`` there) is what readers of a loading slot wait on.  So
the state machine is tested without threads, step by step (``tests/test_serve_cache.py``).

Policies (``POLICIES``; each has ``help``); every eviction policy also exists as ``<name>+prefetch``, which
adds cross-layer-gate prefetch (layer l+1's router applied to layer l's router input predicts layer
l+1's experts, read on a background thread; Fate, mixtral-offloading) to the same eviction.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moekit.errors import MoekitError
from moekit.registry import Registry


class Policy:
    """Admission and eviction for one layer's cache of ``capacity`` experts."""

    help: str = ""
    prefetch: bool = False

    def __init__(self, capacity: int, num_experts: int, profile: np.ndarray | None = None) -> None:
        self.capacity = capacity
        self.num_experts = num_experts
        self._tick = itertools.count()
        self.recency: OrderedDict[int, int] = OrderedDict()  # resident experts, least recent first

    @classmethod
    def layer_capacities(cls, slots: int, num_layers: int, num_experts: int, min_slots: int) -> list[int]:
        """Slots of each MoE layer (in order) for a budget of ``slots`` per layer: the same everywhere."""
        return [slots] * num_layers

    def admit(self, expert: int) -> bool:
        """Whether a missed expert may be inserted."""
        return self.capacity > 0

    def step(self) -> None:
        """One forward of this layer begins (before its ``request`` calls)."""

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


def _register(name: str, prefetch_variant: bool = True):
    """Register a policy as ``name`` and, with ``prefetch_variant``, ``name+prefetch`` (same eviction, plus
    cross-layer-gate prefetch)."""

    def deco(cls: type[Policy]) -> type[Policy]:
        POLICIES.register(name, help=cls.help)(cls)
        if prefetch_variant:
            variant = type(cls.__name__ + "Prefetch", (cls,), {
                "prefetch": True, "__doc__": cls.__doc__,
                "help": cls.help.rstrip(".") + ", plus cross-layer-gate prefetch on a background thread"})
            POLICIES.register(name + "+prefetch", help=variant.help)(variant)
        return cls

    return deco


@_register("lru")
class LRU(Policy):
    """Least recently used."""

    help = "Evict the least recently used expert"


@_register("lfu")
class LFU(Policy):
    """Least frequently used (counts over the whole past, kept across evictions), ties to the least recent."""

    help = "Evict the expert with the fewest requests so far (ties: least recent)"

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


@_register("lfru")
class LFRU(Policy):
    """Frequency-weighted LRU: each expert's score is its requests weighted by recency,
    ``Σ decay^(age in forwards of this layer)``; evict the lowest score, ties to the least recent.

    ``decay`` → 0 is LRU, ``decay`` = 1 is LFU; the default (a half-life of ``HALF_LIFE`` forwards) was
    chosen on the bundled models' traces (docs/serving.md).  As in vLLM's expert cache (PR #37190)."""

    HALF_LIFE = 8.0
    help = f"Evict the lowest recency-weighted request count (half-life {HALF_LIFE:g} steps; LRU..LFU)"

    def __init__(self, capacity: int, num_experts: int, profile: np.ndarray | None = None,
                 decay: float | None = None) -> None:
        super().__init__(capacity, num_experts, profile)
        self.decay = 0.5 ** (1 / self.HALF_LIFE) if decay is None else float(decay)
        self.now = 0
        self.score: dict[int, tuple[float, int]] = {}  # expert -> (score at time t, t)

    def step(self) -> None:
        self.now += 1

    def request(self, expert: int) -> None:
        self.score[expert] = (self.value(expert) + 1.0, self.now)

    def value(self, expert: int) -> float:
        """The expert's score now."""
        s, t = self.score.get(expert, (0.0, self.now))
        return s * self.decay ** (self.now - t)

    def victim(self, candidates: Iterable[int]) -> int | None:
        allowed = set(candidates)
        order = {e: i for i, e in enumerate(self.recency)}
        best = [e for e in self.recency if e in allowed]
        return min(best, key=lambda e: (self.value(e), order[e])) if best else None


@_register("fate")
class Fate(LRU):
    """LRU within a layer; the slots are split across layers in favour of shallow ones (Fate's shallow-favouring
    cache): layer i of L gets a share proportional to ``2 - i/(L-1)`` (the first twice the last) of the same total
    ``slots · L``, at least ``min_slots`` (a token's experts) and at most E each, rounded by largest remainder.
    The paper gives no formula; this linear one is ours (docs/serving.md)."""

    help = "LRU, with the slot budget split across layers in favour of shallow ones (first layer 2x the last)"

    @classmethod
    def layer_capacities(cls, slots: int, num_layers: int, num_experts: int, min_slots: int) -> list[int]:
        return shallow_favouring(slots * num_layers, num_layers, min(min_slots, slots), num_experts)


def shallow_favouring(total: int, num_layers: int, low: int, high: int) -> list[int]:
    """``total`` slots over ``num_layers`` layers with weights ``2 - i/(L-1)``, each in [low, high] (largest
    remainder rounding; what a bound takes is shared out again)."""
    if num_layers == 1:
        return [min(total, high)]
    weights = [2 - i / (num_layers - 1) for i in range(num_layers)]
    caps = [low] * num_layers
    left = total - low * num_layers
    open_ = [i for i in range(num_layers) if caps[i] < high]
    while left > 0 and open_:
        w = sum(weights[i] for i in open_)
        share = {i: left * weights[i] / w for i in open_}
        take = {i: min(math.floor(share[i]), high - caps[i]) for i in open_}
        given = sum(take.values())
        rest = left - given
        for i in sorted(open_, key=lambda i: (-(share[i] - math.floor(share[i])), i)):
            if rest <= 0:
                break
            if caps[i] + take[i] < high:
                take[i] += 1
                rest -= 1
        for i in open_:
            caps[i] += take[i]
        new_left = total - sum(caps)
        if new_left == left:
            break
        left = new_left
        open_ = [i for i in open_ if caps[i] < high]
    return caps


@_register("static", prefetch_variant=False)
class Static(Policy):
    """The top-C experts of a frequency profile are pinned; others are never cached."""

    help = "Pin the top-C experts of a frequency profile (--profile trace); never cache others"

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


@_register("none", prefetch_variant=False)
class NoCache(Policy):
    """On demand, nothing cached."""

    help = "No cache: every requested expert is read on demand"

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
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0


def _bank_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A slot bank's tensor: on the CPU, on 2 MiB pages where the system has them (the decode kernel streams the
    slots like resident weights, docs/nn.md "Huge pages"); elsewhere a plain allocation."""
    from moekit.nn.huge_pages import HUGE_PAGE, empty_on_huge_pages, huge_pages_supported

    nbytes = math.prod(shape) * dtype.itemsize
    if torch.device(device).type == "cpu" and nbytes >= HUGE_PAGE and huge_pages_supported():
        return empty_on_huge_pages(shape, dtype)
    return torch.empty(shape, dtype=dtype, device=device)


class LayerCache:
    """One MoE layer's slots in the fast tier (a bank of ``slots`` experts per fused tensor) and their state."""

    def __init__(self, layer: int, slots: int, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 device: torch.device, policy: Policy) -> None:
        self.layer = layer
        self.slots = slots
        self.bank = {n: _bank_tensor((slots, *shape), dt, device) for n, (shape, dt) in shapes.items()}
        self._views = [{n: t[i] for n, t in self.bank.items()} for i in range(slots)]  # made once, not per step
        self.slot_of: dict[int, int] = {}        # resident or loading expert → slot
        #: expert → slot for the resident experts, -1 for the others (loading or absent): what a native decode step
        #: reads under the engine's lock to run the hits on the slot bank (``moekit.nn.fused_decode.SlotBank``)
        self.table = torch.full((policy.num_experts,), -1, dtype=torch.int64)
        self.loading: dict[int, Any] = {}        # expert → the token its readers wait on, while it loads
        self.free = list(range(slots - 1, -1, -1))
        self.pins: dict[int, int] = {}
        self.prefetched: set[int] = set()         # brought by prefetch, not yet requested
        self.policy = policy
        self.stats = LayerStats()
        self.forwards = 0
        self._released: int | None = None

    # ----- the state machine ------------------------------------------------------------------------------
    def state(self, expert: int) -> str:
        """``"resident"``, ``"loading"`` or ``"absent"``."""
        if expert not in self.slot_of:
            return "absent"
        return "loading" if expert in self.loading else "resident"

    def claim(self, expert: int, token: Any = None, *, pin: bool = True, keep: Iterable[int] = (),
              prefetch: bool = False) -> int | None:
        """A slot for absent ``expert``: a free one, else the policy's victim among the unpinned residents not in
        ``keep``; the expert becomes loading (and pinned with ``pin``). None when the policy does not admit it
        or nothing may be evicted."""
        if expert in self.slot_of:
            raise MoekitError(f"expert {self.layer}:{expert} is already {self.state(expert)}")
        if not (self.slots and self.policy.admit(expert)):
            return None
        if self.free:
            slot = self.free.pop()
        else:
            skip = set(keep)
            victim = self.policy.victim([e for e in self.evictable() if e not in skip])
            if victim is None:
                return None
            slot = self.slot_of.pop(victim)
            self.table[victim] = -1
            self.policy.evict(victim)
            if victim in self.prefetched:
                self.prefetched.discard(victim)
                self.stats.prefetch_wasted += 1
        self.slot_of[expert] = slot
        self.loading[expert] = token
        if pin:
            self.pins[expert] = self.pins.get(expert, 0) + 1
        if prefetch:
            self.prefetched.add(expert)
            self.stats.prefetch_issued += 1
        return slot

    def finish(self, expert: int, ok: bool = True) -> Any:
        """The read of loading ``expert`` ended: it becomes resident, or (failed) its slot is free again and
        its pins are dropped. Returns the claim's token (for the caller to signal its waiters)."""
        token = self.loading.pop(expert)
        if ok:
            self.policy.insert(expert)
            self.table[expert] = self.slot_of[expert]
        else:
            self.free.append(self.slot_of.pop(expert))
            self.pins.pop(expert, None)
            self.prefetched.discard(expert)
        return token

    def lookup(self, experts: Iterable[int], decode: bool) -> dict[int, str]:
        """One forward's requests: count them, pin the present ones; per expert ``"hit"`` (resident), ``"wait"``
        (loading: a prefetch in flight) or ``"miss"`` (absent; the caller claims or bypasses)."""
        st = self.stats
        self.forwards += 1
        self.policy.step()
        plan = {}
        for e in experts:
            self.policy.request(e)
            st.requests += 1
            st.decode_requests += decode
            if e in self.slot_of:
                self.pins[e] = self.pins.get(e, 0) + 1
                st.hits += 1
                st.decode_hits += decode
                if e in self.prefetched:
                    self.prefetched.discard(e)
                    st.prefetch_used += 1
                if e in self.loading:
                    st.late_prefetch += 1
                    plan[e] = "wait"
                else:
                    self.policy.touch(e)
                    plan[e] = "hit"
            else:
                st.misses += 1
                st.decode_misses += decode
                plan[e] = "miss"
        return plan

    def release(self, experts: Iterable[int], slot_order: Iterable[int]) -> None:
        """Unpin a forward's experts; recency follows the request order (a later slot is more recent, as in
        ``moekit.analysis.cache``), whatever order they were loaded in."""
        for e in experts:
            if e in self.pins:
                self.pins[e] -= 1
                if self.pins[e] <= 0:
                    del self.pins[e]
        order = list(dict.fromkeys(reversed(list(slot_order))))[::-1]
        for e in order:
            if e in self.slot_of and e not in self.loading:
                self.policy.touch(e)

    # ----- data -----------------------------------------------------------------------------------------------
    def weights(self, slot: int) -> dict[str, torch.Tensor]:
        """Views of the slot's tensors (the same dict every time)."""
        return self._views[slot]

    def nbytes(self) -> int:
        if self._released is not None:
            return self._released
        return sum(t.numel() * t.element_size() for t in self.bank.values())

    def release_memory(self) -> None:
        """Drop the slot bank (after the engine stops); ``nbytes`` keeps reporting its size."""
        if self._released is None:
            self._released = self.nbytes()
        self.bank = {}
        self._views = []
        self.slot_of.clear()
        self.loading.clear()
        self.table.fill_(-1)
        self.free = []

    def evictable(self) -> list[int]:
        return [e for e in self.slot_of if e not in self.loading and not self.pins.get(e)]

    def resident(self) -> set[int]:
        return {e for e in self.slot_of if e not in self.loading}
