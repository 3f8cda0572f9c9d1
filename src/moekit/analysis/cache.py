"""Expert-cache simulation over a routing trace: LRU, LFU, static frequency, Belady MIN with and
without bypass; per-layer and global scope.

Sources: Belady 1966 (MIN: evict the item used farthest in the future, optimal for demand paging);
Belady with bypass is the optimum when a miss may be served without caching (CPU-compute systems:
Fiddler, kTransformers, llama.cpp; see ``shared/reference/anchors-offload.md`` §2); per-layer LRU as in
mixtral-offloading (Eliseev & Mazur 2023); LFU as in MoE-Infinity; static top-C by frequency as in
Fiddler / kTransformers' ``frequency`` placement.  The miss ratio m / m_OPT follows the anchors'
"what to report".

Conventions (all policies, both scopes):

- The stream is the trace's tokens in order, across documents, cold start once (the cache starts
  empty and compulsory misses count).  A request is one (token, expert) selection; -1 is nothing.
- A token's experts (per layer: that layer's k; global: all layers' experts, keys ``(layer, e)``)
  are requested together: hits are looked up before any update, and (except with bypass) all of them
  must be resident afterwards, so eviction only chooses among residents the token did not request.
  Capacity C must therefore be >= the experts one token requests (C >= k per layer, C >= L*k global).
- LRU: evict the least recently used (within one token, a later slot counts as more recent).
- LFU: evict the lowest request count over the whole past (counts persist across evictions;
  "perfect LFU"); ties go to the least recently used.
- static: the C experts with the highest request count over ``profile`` (default: the stream
  itself, an oracle) are pinned; nothing else is ever cached (a miss is served and not inserted).
  A pinned expert is loaded at its first request, which counts as a miss like every cold miss.
  Since it never inserts a miss it is not bounded by Belady MIN (it can beat it), only by bypass.
- belady: MIN with insertion; evict the resident whose next request is farthest (never = infinity).
- belady_bypass: after each token the cache keeps the C items with the nearest next request among
  the residents and the token's requests, so a missed item is not inserted when its next use is
  farther than every resident's.  Its misses are a lower bound for every policy that preserves routing.
- A token's experts are assumed distinct (as top-k produces); a repeated id counts as two requests.

Cost: one numpy step per token updates every (policy, layer, capacity) cache at once, O(rows x
items log items) per token, linear in the trace length (Belady included: next uses come from one
stable argsort, so nothing is quadratic); per-layer LRU and static are closed-form counts without a
loop.  On the 1M-record bench (16 x 65,536 tokens, E=64, k=8, 5 sizes) one policy takes 2-7
CPU-seconds per scope; all five together ~14 (per-layer) and ~19 (global).  The optimality of
``belady`` / ``belady_bypass`` under these conventions is checked against exhaustive search in
``tests/test_analysis_cache.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from moekit.analysis._common import as_ids
from moekit.errors import MoekitError

POLICIES: tuple[str, ...] = ("lru", "lfu", "static", "belady", "belady_bypass")
MULTIPLIERS: tuple[float, ...] = (1, 1.5, 2, 3, 4)
_DYNAMIC = ("lru", "lfu", "belady", "belady_bypass")


def capacities_for(top_k: int, multipliers: Sequence[float] = MULTIPLIERS) -> list[int]:
    """Cache sizes ``max(k, floor(m * k))`` for each multiplier m."""
    return [max(int(top_k), int(np.floor(m * top_k))) for m in multipliers]


def next_use(stream: np.ndarray) -> np.ndarray:
    """``[N, K]``: for each request (token t, slot j) the next token t' > t requesting the same item,
    or N when there is none (-1 entries get N).  One stable argsort by item (time order is kept within
    an item), no search."""
    s = np.asarray(stream, dtype=np.int64)
    n, k = s.shape
    out = np.full(n * k, n, dtype=np.int64)
    flat = s.ravel()
    pos = np.flatnonzero(flat >= 0)
    if pos.size == 0:
        return out.reshape(n, k)
    items = flat[pos]
    order = np.argsort(items, kind="stable")
    srt_pos = pos[order]
    srt_items = items[order]
    t_of = srt_pos // k
    nxt_t = np.full(pos.size, n, dtype=np.int64)
    same = srt_items[1:] == srt_items[:-1]
    nxt_t[:-1] = np.where(same, t_of[1:], n)
    # a repeated item within one token: skip to the first later token
    while True:
        dup = nxt_t[:-1] == t_of[:-1]
        if not dup.any():
            break
        nxt_t[:-1] = np.where(dup, nxt_t[1:], nxt_t[:-1])
    out[srt_pos] = nxt_t
    return out.reshape(n, k)


def _static_hits(streams: np.ndarray, n_items: int, capacities: Sequence[int],
                 profile: np.ndarray | None) -> np.ndarray:
    """``[G, C]`` hits of the static top-C cache per stream (ties: lower item id first)."""
    out = np.zeros((streams.shape[0], len(capacities)), dtype=np.int64)
    for g in range(streams.shape[0]):
        s = streams[g]
        prof = s if profile is None else np.asarray(profile[g])
        cnt = np.bincount(prof[prof >= 0], minlength=n_items)[:n_items]
        order = np.lexsort((np.arange(n_items), -cnt))
        req = np.bincount(s[s >= 0], minlength=n_items)[:n_items]
        # the first request of a pinned item is a (compulsory) miss, as for the other policies
        csum = np.concatenate([[0], np.cumsum(np.maximum(req[order] - 1, 0))])
        out[g] = [csum[min(c, n_items)] for c in capacities]
    return out


def first_use(stream: np.ndarray, n_items: int) -> np.ndarray:
    """``[n_items]``: the first token requesting each item, or N when none does."""
    s = np.asarray(stream, dtype=np.int64)
    n = s.shape[0]
    out = np.full(n_items + 1, n, dtype=np.int64)
    t = np.broadcast_to(np.arange(n)[:, None], s.shape)
    col = np.where(s >= 0, s, n_items)
    np.minimum.at(out, col.ravel(), t.ravel())
    return out[:n_items]


def _simulate(streams: np.ndarray, n_items: int, policies: Sequence[str], capacities: Sequence[int],
              initial: np.ndarray | None = None) -> np.ndarray:
    """Dynamic policies on ``G`` independent streams ``[G, N, K]`` side by side.

    ``initial`` (``[G, n_items]`` bool): each stream's cache before its first token (warm start; default empty);
    its items rank below every requested one for LRU/LFU (oldest first by id) and by their first use for Belady.
    Returns hits ``[P, G, C]``.  One numpy step per token updates every (policy, stream, capacity)
    cache at once: hits are looked up, the requested items get their new priority, and each cache
    over capacity drops its lowest-priority candidates (residents not requested, or with bypass all
    residents and requested items).  Rows are ordered policy-major, so each policy is a slice."""
    g_n, n, k = streams.shape
    pol = list(policies)
    n_p, n_c = len(pol), len(capacities)
    per_p = g_n * n_c
    n_rows = n_p * per_p
    width = n_items + 1  # column n_items absorbs the -1 requests and is never resident
    g_of = np.tile(np.repeat(np.arange(g_n), n_c), n_p)
    cap = np.tile(np.asarray(capacities, dtype=np.int64), n_p * g_n)
    bypass = np.repeat([p == "belady_bypass" for p in pol], per_p)
    # per token, per stream: column of each slot; rows pick their stream's columns
    cols = np.ascontiguousarray(np.where(streams >= 0, streams, n_items).transpose(1, 0, 2))  # [N, G, K]
    base = (np.arange(n_rows, dtype=np.int64) * width)[:, None]
    need_nu = any(p in ("belady", "belady_bypass") for p in pol)
    nus = (np.ascontiguousarray(np.stack([next_use(streams[g]) for g in range(g_n)]).transpose(1, 0, 2))
           if need_nu else None)
    resident = np.zeros((n_rows, width), dtype=bool)
    req = np.zeros((n_rows, width), dtype=bool)
    prio = np.zeros((n_rows, width), dtype=np.int64)  # larger = kept
    if initial is not None:
        init = np.zeros((g_n, width), dtype=bool)
        init[:, :n_items] = np.asarray(initial, dtype=bool)[:, :n_items]
        resident[:] = init[g_of]
        items = np.arange(width, dtype=np.int64)
        first = np.stack([np.append(first_use(streams[g], n_items), n) for g in range(g_n)])  # [G, width]
        is_bel = np.repeat([p in ("belady", "belady_bypass") for p in pol], per_p)
        prio[:] = np.where(is_bel[:, None], -(first[g_of] * width + items), -(width - items))
    freq = np.zeros((n_rows, width), dtype=np.int64)
    hits = np.zeros(n_rows, dtype=np.int64)
    slot = np.arange(k, dtype=np.int64)
    rows = np.arange(n_rows)
    big = np.iinfo(np.int64).max
    key_span = (n + 1) * k
    res_f, req_f, prio_f, freq_f = resident.ravel(), req.ravel(), prio.ravel(), freq.ravel()
    slices = [slice(i * per_p, (i + 1) * per_p) for i in range(n_p)]
    for t in range(n):
        col = cols[t][g_of]  # [R, K]
        flat = base + col
        hits += res_f[flat].sum(axis=1)
        req.fill(False)
        req_f[flat] = True
        req[:, n_items] = False
        key = t * k + slot  # recency key of each slot (later slot = more recent)
        for i, p in enumerate(pol):
            sl = slices[i]
            fl = flat[sl]
            if p == "lru":
                prio_f[fl] = key
            elif p == "lfu":
                freq_f[fl] += 1
                prio_f[fl] = freq_f[fl] * key_span + key
            else:
                nu = nus[t][g_of[sl]]
                prio_f[fl] = -(nu * width + col[sl])
        union = resident | req
        excess = union.sum(axis=1) - cap
        if excess.max() > 0:
            cand = np.where(bypass[:, None], union, resident & ~req)
            pv = np.where(cand, prio, big)
            thr = np.sort(pv, axis=1)[rows, np.maximum(excess, 1) - 1]
            thr = np.where(excess > 0, thr, -1 - big)
            union &= ~(cand & (pv <= thr[:, None]))
        resident = union
        res_f = resident.ravel()
    return hits.reshape(n_p, g_n, n_c)


def _lru_hits(stream: np.ndarray, n_items: int, capacities: Sequence[int]) -> np.ndarray:
    """Per-stream LRU hits for every capacity without a simulation loop.

    With batched lookups and co-residency, the LRU cache after token t holds the C items with the
    latest last-use keys (t' * K + slot), so a request hits iff fewer than C items were used more
    recently than its own previous use: count them from the running maximum of the keys."""
    n, k = stream.shape
    keys = np.full((n + 1, n_items + 1), -1, dtype=np.int64)
    t_idx = np.broadcast_to(np.arange(n)[:, None], (n, k))
    col = np.where(stream >= 0, stream, n_items)
    keys[t_idx + 1, col] = t_idx * k + np.arange(k)[None, :]
    keys = np.maximum.accumulate(keys[:, :n_items], axis=0)  # row t: last-use keys before token t
    depth = max(capacities)
    hist = np.zeros(depth + 1, dtype=np.int64)
    step = max(1, (1 << 22) // max(k * n_items, 1))
    for s in range(0, n, step):
        rows = keys[s : min(s + step, n)]
        c = stream[s : s + step]
        kx = np.take_along_axis(rows, np.maximum(c, 0), axis=1)  # [B, K]
        rank = (rows[:, None, :] > kx[:, :, None]).sum(axis=2)
        ok = (c >= 0) & (kx >= 0)
        hist += np.bincount(np.minimum(rank[ok], depth), minlength=depth + 1)
    cum = np.concatenate([[0], np.cumsum(hist)])
    return np.array([cum[min(c, depth)] for c in capacities], dtype=np.int64)


def _check_policies(policies: Sequence[str]) -> list[str]:
    pol = list(policies)
    bad = [p for p in pol if p not in POLICIES]
    if bad:
        raise MoekitError(f"unknown cache policies {bad}; choose from {list(POLICIES)}")
    return pol


def _run(streams: np.ndarray, n_items: int, policies: Sequence[str], capacities: Sequence[int],
         profile: np.ndarray | None = None, initial: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Hits ``{policy: [G, C]}`` for streams ``[G, N, K]`` (``initial``: warm start, dynamic policies only)."""
    pol = _check_policies(policies)
    if initial is not None and "static" in pol:
        raise MoekitError("a warm initial cache applies to the dynamic policies, not 'static'")
    per_token = int((streams >= 0).sum(axis=2).max()) if streams.size else 0
    if min(capacities) < per_token and any(p in ("lru", "lfu", "belady") for p in pol):
        raise MoekitError(f"cache capacity {min(capacities)} is smaller than the {per_token} experts one token "
                          "requests; the co-resident policies need C >= that")
    out: dict[str, np.ndarray] = {}
    dyn = [p for p in pol if p in _DYNAMIC]
    if "lru" in dyn and initial is None and n_items * streams.shape[2] <= 4096:  # closed form when [K, items] is small
        out["lru"] = np.stack([_lru_hits(streams[g], n_items, capacities) for g in range(streams.shape[0])])
        dyn.remove("lru")
    if dyn:
        h = _simulate(streams, n_items, dyn, capacities, initial)
        for i, p in enumerate(dyn):
            out[p] = h[i]
    if "static" in pol:
        out["static"] = _static_hits(streams, n_items, capacities, profile)
    return out


def simulate_cache(
    ids_layer: np.ndarray,
    policy: str,
    capacity: int,
    num_experts: int | None = None,
    profile: np.ndarray | None = None,
    initial: Sequence[int] | None = None,
) -> dict[str, Any]:
    """One cache over one request stream ``ids_layer`` ``[N, K]`` (a layer's selections, or any item
    stream: for a global cache pass the ``(layer, e)`` keys as ``layer * E + e``).

    Returns ``{"policy", "capacity", "hits", "misses", "requests", "hit_rate"}``; see the module
    docstring for the conventions.  ``profile`` (``[M, K]`` ids) is the static policy's frequency
    source.  ``initial``: the items resident before the first token (a warm cache, at most ``capacity``; the
    dynamic policies only), e.g. an offload engine's cache when its decode began."""
    s = np.asarray(ids_layer)
    if s.ndim != 2:
        raise MoekitError(f"simulate_cache expects ids [N, K], got shape {s.shape}")
    n_items = int(num_experts) if num_experts is not None else (int(s.max()) + 1 if s.size else 1)
    s = as_ids(s, max(n_items, 1), ndim=2)
    prof = None if profile is None else as_ids(profile, n_items, ndim=2)[None]
    init = None
    if initial is not None:
        items = sorted({int(e) for e in initial})
        if len(items) > capacity or (items and not 0 <= items[0] <= items[-1] < n_items):
            raise MoekitError(f"initial cache {items} does not fit {capacity} slots of items [0, {n_items})")
        init = np.zeros((1, n_items), dtype=bool)
        init[0, items] = True
    h = int(_run(s[None], n_items, [policy], [int(capacity)], prof, init)[policy][0, 0])
    req = int((s >= 0).sum())
    return {"policy": policy, "capacity": int(capacity), "hits": h, "misses": req - h, "requests": req,
            "hit_rate": h / req if req else float("nan")}


def cache_curves(
    trace: Any,
    multipliers: Sequence[float] = MULTIPLIERS,
    policies: Sequence[str] = POLICIES,
    scopes: Sequence[str] = ("layer", "global"),
    with_belady: bool = True,
    profile: Any | None = None,
) -> dict[str, Any]:
    """Hit rate against cache size for every policy, per-layer and global.

    ``trace`` is a ``RoutingTrace`` (or anything with ``ids`` ``[L, N, K]``, ``num_experts`` and
    ``top_k``).  Per-layer: every layer has its own cache of C = ``capacities_for(k)`` slots, and the
    numbers are pooled over layers (``per_layer_hit_rate`` keeps them apart).  Global: one cache over
    ``(layer, e)`` keys with C * L slots, a token's experts of all layers requested together.
    Returns ``{"multipliers", "capacities", "layer": {...}, "global": {...}}`` where each scope has,
    per policy, ``hits``, ``misses``, ``hit_rate`` and ``miss_ratio_to_belady`` (misses / Belady's
    misses; NaN when Belady has none) lists over C.  ``with_belady=False`` skips the Belady run that
    the ratio needs when it is not among ``policies`` (the ratio is then left out).  ``profile``
    (another trace of the same model, e.g. a profiling split) supplies the static policy's
    frequencies; by default they come from the trace itself (an oracle)."""
    ids = np.asarray(trace.ids)
    if ids.ndim != 3 or ids.shape[1] == 0:
        raise MoekitError("cache_curves needs a non-empty trace")
    n_layers = ids.shape[0]
    ne = list(trace.num_experts)
    k = int(max(trace.top_k))
    caps = capacities_for(k, multipliers)
    pol = _check_policies(policies)
    if scopes and not set(scopes) <= {"layer", "global"}:
        raise MoekitError(f"scopes must be 'layer' and/or 'global', got {list(scopes)}")
    need = list(dict.fromkeys([*pol, "belady"])) if with_belady else pol
    out: dict[str, Any] = {"multipliers": [float(m) for m in multipliers], "capacities": caps}
    prof_ids = None
    if profile is not None:
        prof_ids = np.asarray(profile.ids)
        if prof_ids.ndim != 3 or prof_ids.shape[0] != n_layers:
            raise MoekitError(f"profile trace has shape {prof_ids.shape}, expected {n_layers} layers")
    if "layer" in scopes:
        e_max = max(ne)
        streams = np.stack([as_ids(ids[li], ne[li], ndim=2) for li in range(n_layers)])
        prof = None if prof_ids is None else np.stack([as_ids(prof_ids[li], ne[li], ndim=2)
                                                       for li in range(n_layers)])
        res = _run(streams, e_max, need, caps, prof)
        req = (streams >= 0).sum(axis=(1, 2))
        out["layer"] = _tabulate({p: res[p].sum(axis=0) for p in need}, int(req.sum()), pol)
        out["layer"]["per_layer_hit_rate"] = {p: (res[p] / np.maximum(req[:, None], 1)).tolist() for p in pol}
    if "global" in scopes:
        offs = np.concatenate([[0], np.cumsum(ne)])
        stream = np.concatenate(
            [np.where(ids[li] >= 0, as_ids(ids[li], ne[li], ndim=2) + offs[li], -1) for li in range(n_layers)],
            axis=1)
        gcaps = [c * n_layers for c in caps]
        prof = None
        if prof_ids is not None:
            prof = np.concatenate([np.where(prof_ids[li] >= 0, as_ids(prof_ids[li], ne[li], ndim=2) + offs[li], -1)
                                   for li in range(n_layers)], axis=1)[None]
        res = _run(stream[None], int(offs[-1]), need, gcaps, prof)
        out["global"] = _tabulate({p: res[p][0] for p in need}, int((stream >= 0).sum()), pol)
        out["global"]["capacities"] = gcaps
    return out


def _tabulate(hits: dict[str, np.ndarray], requests: int, policies: Sequence[str]) -> dict[str, Any]:
    bel_miss = requests - hits["belady"] if "belady" in hits else None
    tab: dict[str, Any] = {"requests": requests}
    for p in policies:
        h = hits[p]
        miss = requests - h
        tab[p] = {"hits": h.tolist(), "misses": miss.tolist(),
                  "hit_rate": (h / requests).tolist() if requests else [float("nan")] * len(h)}
        if bel_miss is not None:
            ratio = np.where(bel_miss > 0, miss / np.maximum(bel_miss, 1), np.nan)
            tab[p]["miss_ratio_to_belady"] = ratio.tolist()
    return tab
