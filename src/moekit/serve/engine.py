"""Offloaded generation: every expert computation of a model goes through an expert cache.

``offload(lm, ...)`` registers an experts implementation with transformers (``moekit_offload``) and
switches ``lm.model`` to it; each experts forward asks the engine for its experts, which come from the
cache (fast tier) or the store (slow tier), and computes exactly what transformers' ``grouped_mm``
implementation computes (same per-expert matmuls, same fp32 weighting and sum over k), so greedy
generation yields the tokens of the fully loaded model for every policy.  Anything that runs the
model inside the ``with`` block (``moekit.generation.stream``, the server, a plain forward) is offloaded.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from moekit.errors import MoekitError
from moekit.models.loading import LoadedModel
from moekit.nn.dispatch import combine_slots
from moekit.serve.cache import POLICIES, LayerCache, LayerStats, Policy
from moekit.serve.store import ExpertStore, FileStore, store_for

IMPL_NAME = "moekit_offload"
TRACE_LIMIT = 200_000  # decode steps per layer kept for the Belady replay


def _offload_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                             top_k_weights: torch.Tensor) -> torch.Tensor:
    engine = getattr(self, "_moekit_offload_engine", None)
    if engine is None:
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    return engine.experts_forward(self, hidden_states, top_k_index, top_k_weights)


def _register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if IMPL_NAME not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPL_NAME, _offload_experts_forward)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """One expert's rows, with the kernel transformers' grouped_mm path uses (a one-group grouped_mm)."""
    from transformers.integrations.moe import _grouped_mm

    wt = w if transposed else w.transpose(-2, -1)
    offs = torch.tensor([x.shape[0]], dtype=torch.int32, device=x.device)
    out = _grouped_mm(x, wt.unsqueeze(0), offs)
    if b is not None:
        out.add_(b)
    return out


class OffloadEngine:
    """Expert cache + store + prefetcher + statistics for one model (see ``offload``)."""

    def __init__(self, lm: LoadedModel, store: ExpertStore, policy: str = "lru+prefetch",
                 cache_mb: float | None = None, slots: int | None = None, device: str | torch.device | None = None,
                 profile: Any = None, io_threads: int = 2, prefetch_top: int | None = None) -> None:
        self.lm = lm
        self.io_threads = io_threads
        self.prefetch_top = prefetch_top
        self.store = store
        self.policy_name = policy
        policy_cls: type[Policy] = POLICIES.get(policy)
        self.prefetch = bool(policy_cls.prefetch)
        self.device = torch.device(device) if device is not None else lm.device
        self.views = list(lm.moe)
        for v in self.views:
            v.require_standard_bank("offloading")
        self.next_view = {v.index: (self.views[i + 1] if i + 1 < len(self.views) else None)
                          for i, v in enumerate(self.views)}
        per_slot = sum(store.expert_bytes[v.index] for v in self.views)
        if policy == "none":
            n_slots = 0
        elif slots is not None:
            n_slots = int(slots)
        elif cache_mb is not None:
            n_slots = int(cache_mb * 2**20 // per_slot)
            if n_slots < 1:
                raise MoekitError(f"--cache-mb {cache_mb} holds no expert: one expert per layer needs "
                                  f"{per_slot / 2**20:.2f} MB")
        else:
            n_slots = 2 * max(v.top_k for v in self.views)
        n_slots = min(n_slots, max(v.num_experts for v in self.views))
        self.slots = n_slots
        self.budget_bytes = int(cache_mb * 2**20) if cache_mb is not None else n_slots * per_slot
        profiles = _profile_counts(profile, self.views) if profile is not None else {}
        self.lock = threading.Lock()
        self.layers: dict[int, LayerCache] = {}
        for v in self.views:
            pol = policy_cls(n_slots, v.num_experts, profiles.get(v.index))
            self.layers[v.index] = LayerCache(v.index, n_slots, store.shapes(v.index), self.device, pol)
        self._scratch: dict[tuple, dict[str, torch.Tensor]] = {}
        self._staging: dict[tuple, dict[str, torch.Tensor]] = {}
        self.bytes_read = 0
        self.decode_bytes_read = 0
        self.stall_s = 0.0
        self.prefetch_issued = 0
        self.prefetch_used = 0
        self.prefetch_wasted = 0
        self.prefetch_skipped = 0
        self.pred_hits = 0
        self.pred_requests = 0
        self.pred_total = 0
        self._predicted: dict[int, set[int]] = {}
        self.trace: dict[int, list[list[int]]] = {v.index: [] for v in self.views}
        self.warm_state: dict[int, set[int]] = {}
        self.prefill_tokens = self.decode_tokens = 0
        self.prefill_s = self.decode_s = 0.0
        self._phase_decode = False
        self._q: queue.Queue | None = None
        self._worker: threading.Thread | None = None
        self._hooks: list = []
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._failed: dict[tuple[int, int], BaseException] = {}
        self._prev_impl: Any = None
        self._t0 = 0.0

    # ----- lifecycle --------------------------------------------------------------------------------
    def start(self) -> OffloadEngine:
        _register()
        model = self.lm.model
        self._prev_impl = model.config._experts_implementation
        for v in self.views:
            v.experts._moekit_offload_engine = self
            v.experts._moekit_layer = v.index
        model.set_experts_implementation(IMPL_NAME)
        self._hooks = [model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
                       model.register_forward_hook(self._post_forward)]
        if self.io_threads > 0:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.io_threads, thread_name_prefix="moekit-io")
        if self.prefetch:
            self._q = queue.Queue()
            self._worker = threading.Thread(target=self._prefetch_loop, name="moekit-prefetch", daemon=True)
            self._worker.start()
        return self

    def stop(self) -> None:
        if self._worker is not None and self._q is not None:
            self._q.put(None)
            self._worker.join()
            self._worker = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for h in self._hooks:
            h.remove()
        self._hooks = []
        model = self.lm.model
        for v in self.views:
            for attr in ("_moekit_offload_engine", "_moekit_layer"):
                if hasattr(v.experts, attr):
                    delattr(v.experts, attr)
        if self._prev_impl is not None:
            model.set_experts_implementation(self._prev_impl)
        with self.lock:  # free the fast tier; the statistics stay readable
            for lc in self.layers.values():
                lc.release_memory()
            self._scratch.clear()
            self._staging.clear()

    def _pre_forward(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        n = int(ids.shape[-1]) if isinstance(ids, torch.Tensor) else 0
        self._phase_decode = n == 1
        self._cur_tokens = n
        self._t0 = time.perf_counter()

    def _post_forward(self, module, args, output) -> None:
        dt = time.perf_counter() - self._t0
        if self._phase_decode:
            self.decode_tokens += self._cur_tokens
            self.decode_s += dt
        else:
            self.prefill_tokens += self._cur_tokens
            self.prefill_s += dt

    # ----- data movement ----------------------------------------------------------------------------
    def _buffers(self, pool: dict, layer: int, pinned: bool) -> dict[str, torch.Tensor]:
        shapes = self.store.shapes(layer)
        key = tuple(sorted((n, s, d) for n, (s, d) in shapes.items()))
        buf = pool.get(key)
        if buf is None:
            pin = pinned and torch.cuda.is_available()
            buf = {n: torch.empty(s, dtype=d, pin_memory=pin) for n, (s, d) in shapes.items()}
            pool[key] = buf
        return buf

    def _load(self, layer: int, expert: int, dst: dict[str, torch.Tensor], staging_pool: dict) -> int:
        """Read one expert into ``dst`` (slot views or scratch), staging through host memory if needed."""
        direct = all(t.device.type == "cpu" and t.is_contiguous() for t in dst.values()) or not isinstance(
            self.store, FileStore)
        if direct:
            return self.store.read(layer, expert, dst)
        stage = self._buffers(staging_pool, layer, pinned=True)
        n = self.store.read(layer, expert, stage)
        for k, t in dst.items():
            t.copy_(stage[k])
        if dst and next(iter(dst.values())).device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        return n

    def _scratch_weights(self, layer: int, j: int = -1) -> dict[str, torch.Tensor]:
        shapes = self.store.shapes(layer)
        key = (j, *sorted((n, s, d) for n, (s, d) in shapes.items()))
        buf = self._scratch.get(key)
        if buf is None:
            buf = {n: torch.empty(s, dtype=d, device=self.device) for n, (s, d) in shapes.items()}
            self._scratch[key] = buf
        return buf

    # ----- the experts forward ------------------------------------------------------------------------
    @torch.no_grad()
    def experts_forward(self, mod: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
        layer = mod._moekit_layer
        lc = self.layers[layer]
        num_tokens, k = top_k_index.shape
        hidden_dim = hidden.shape[-1]
        decode = num_tokens == 1
        flat_ids = top_k_index.reshape(-1)
        sample_weights = top_k_weights.reshape(-1)
        ids_g, perm = torch.sort(flat_ids)
        x_g = hidden[perm // k]
        uniq_t, counts_t = torch.unique_consecutive(ids_g, return_counts=True)
        uniq, counts = uniq_t.tolist(), counts_t.tolist()
        if self.prefetch and decode:
            self._predict(layer, hidden)
        plan = self._acquire(lc, uniq, decode)
        if self._pool is not None:  # admitted misses are read on the I/O threads while the hits are computed
            for e in uniq:
                if plan[e][0] == "miss":
                    reserved = self._reserve(lc, e)
                    if reserved is not None:
                        plan[e] = ("wait", reserved[1])
                        self._pool.submit(self._fill, lc, e, reserved[0], reserved[1], decode)
        bounds, start = {}, 0
        for e, c in zip(uniq, counts, strict=True):
            bounds[e] = (start, start + c)
            start += c
        transposed = bool(getattr(mod, "is_transposed", False))
        has_gate = bool(getattr(mod, "has_gate", True))
        up_name = "gate_up_proj" if has_gate else "up_proj"
        proj = x_g.new_empty(x_g.shape[0], hidden_dim)
        def compute(e: int, w: dict[str, torch.Tensor]) -> None:
            a, b = bounds[e]
            h = _linear(x_g[a:b], w[up_name], w.get(up_name + "_bias"), transposed)
            h = mod._apply_gate(h) if has_gate else mod.act_fn(h)
            proj[a:b] = _linear(h, w["down_proj"], w.get("down_proj_bias"), transposed)

        try:
            for e in [e for e in uniq if plan[e][0] == "hit"] + [e for e in uniq if plan[e][0] == "wait"]:
                compute(e, self._weights_for(lc, e, plan[e], decode))
            bypass = [e for e in uniq if plan[e][0] == "miss"]  # not cached: read into scratch buffers
            width = max(2, self.io_threads)
            if self._pool is not None and len(bypass) > 1:
                for i in range(0, len(bypass), width):
                    chunk = bypass[i:i + width]
                    futs = [self._pool.submit(self._read_scratch, lc.layer, e, j, decode) for j, e in enumerate(chunk)]
                    for e, fut in zip(chunk, futs, strict=True):
                        t0 = time.perf_counter()
                        w = fut.result()
                        self.stall_s += time.perf_counter() - t0
                        compute(e, w)
            else:
                for e in bypass:
                    compute(e, self._weights_for(lc, e, plan[e], decode))
        finally:
            self._release(lc, uniq, flat_ids.tolist())
        if getattr(mod, "has_post_expert_norm", False):
            proj = mod.post_expert_norm(proj)
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = torch.arange(perm.size(0), device=perm.device)
        if self._prev_impl == "moekit":  # the model ran moekit.nn's dispatch before: combine as it does
            return combine_slots(proj, inv_perm, top_k_weights).to(hidden.dtype)
        weighted = proj * sample_weights[perm].unsqueeze(-1)
        out = weighted[inv_perm].view(num_tokens, k, hidden_dim).sum(dim=1)
        return out.to(hidden.dtype)

    def access(self, layer: int, experts: list[int], decode: bool = True) -> list[str]:
        """Request ``experts`` of ``layer`` as one forward would (without computing): ``"hit"``, ``"wait"``
        or ``"miss"`` per expert; for tests and trace replays."""
        lc = self.layers[layer]
        uniq = sorted(set(experts))
        plan = self._acquire(lc, uniq, decode)
        try:
            for e in uniq:
                self._weights_for(lc, e, plan[e], decode)
        finally:
            self._release(lc, uniq, list(experts))
        return [plan[e][0] for e in uniq]

    def _release(self, lc: LayerCache, uniq: list[int], slot_order: list[int]) -> None:
        """Unpin a forward's experts; recency follows the request order (a later slot is more recent,
        as in ``moekit.analysis.cache``), whatever order the experts were loaded in."""
        order = list(dict.fromkeys(reversed(slot_order)))[::-1]
        with self.lock:
            for e in uniq:
                if e in lc.pins:
                    lc.pins[e] -= 1
                    if lc.pins[e] <= 0:
                        del lc.pins[e]
            for e in order:
                if e in lc.slot_of and e not in lc.loading:
                    lc.policy.touch(e)

    def resident(self, layer: int) -> set[int]:
        """Experts of ``layer`` currently in the cache."""
        with self.lock:
            return self.layers[layer].resident()

    def _acquire(self, lc: LayerCache, uniq: list[int], decode: bool) -> dict[int, tuple]:
        plan: dict[int, tuple] = {}
        st: LayerStats = lc.stats
        with self.lock:
            lc.forwards += 1
            if decode:
                if lc.layer not in self.warm_state:
                    self.warm_state[lc.layer] = lc.resident()
                if len(self.trace[lc.layer]) < TRACE_LIMIT:
                    self.trace[lc.layer].append(list(uniq))
                pred = self._predicted.pop(lc.layer, None)
                if pred is not None:
                    self.pred_hits += len(pred & set(uniq))
                    self.pred_requests += len(uniq)
                    self.pred_total += len(pred)
            for e in uniq:
                lc.policy.request(e)
                st.requests += 1
                st.decode_requests += decode
                if e in lc.slot_of:
                    lc.pins[e] = lc.pins.get(e, 0) + 1
                    st.hits += 1
                    st.decode_hits += decode
                    if e in lc.prefetched:
                        lc.prefetched.discard(e)
                        self.prefetch_used += 1
                    if e in lc.loading:
                        st.late_prefetch += 1
                        plan[e] = ("wait", lc.loading[e])
                    else:
                        lc.policy.touch(e)
                        plan[e] = ("hit", lc.slot_of[e])
                else:
                    st.misses += 1
                    st.decode_misses += decode
                    plan[e] = ("miss", None)
        return plan

    def _weights_for(self, lc: LayerCache, e: int, entry: tuple, decode: bool) -> dict[str, torch.Tensor]:
        kind, arg = entry
        if kind == "hit":
            return lc.weights(arg)
        t0 = time.perf_counter()
        if kind == "wait":
            arg.wait()
            with self.lock:
                err = self._failed.pop((lc.layer, e), None)
                if err is not None:
                    raise err
                slot = lc.slot_of[e]
                lc.policy.touch(e)
            self.stall_s += time.perf_counter() - t0
            return lc.weights(slot)
        # a miss: take a free slot or evict, unless the policy does not admit it (then bypass)
        slot = None
        with self.lock:
            if lc.slots and lc.policy.admit(e):
                if lc.free:
                    slot = lc.free.pop()
                else:
                    victim = lc.policy.victim(lc.evictable())
                    if victim is not None:
                        slot = self._evict(lc, victim)
            if slot is not None:
                lc.slot_of[e] = slot
                lc.loading[e] = ev = threading.Event()
                lc.pins[e] = lc.pins.get(e, 0) + 1
        if slot is None:
            dst = self._scratch_weights(lc.layer)
            n = self._load(lc.layer, e, dst, self._staging)
            self._count_read(n, decode)
            self.stall_s += time.perf_counter() - t0
            return dst
        dst = lc.weights(slot)
        try:
            n = self._load(lc.layer, e, dst, self._staging)
        finally:
            with self.lock:
                lc.loading.pop(e, None)
                ev.set()
                lc.policy.insert(e)
        self._count_read(n, decode)
        self.stall_s += time.perf_counter() - t0
        return dst

    def _read_scratch(self, layer: int, e: int, j: int, decode: bool) -> dict[str, torch.Tensor]:
        """Read ``e`` into scratch set ``j`` (an I/O thread; for experts that are not cached)."""
        staging = getattr(self._local, "staging", None)
        if staging is None:
            staging = self._local.staging = {}
        dst = self._scratch_weights(layer, j)
        self._count_read(self._load(layer, e, dst, staging), decode)
        return dst

    def _reserve(self, lc: LayerCache, e: int) -> tuple[int, threading.Event] | None:
        """A slot for missed expert ``e`` (free, or the policy's victim), marked loading and pinned."""
        with self.lock:
            if not (lc.slots and lc.policy.admit(e)):
                return None
            if lc.free:
                slot = lc.free.pop()
            else:
                victim = lc.policy.victim(lc.evictable())
                if victim is None:
                    return None
                slot = self._evict(lc, victim)
            lc.slot_of[e] = slot
            lc.loading[e] = ev = threading.Event()
            lc.pins[e] = lc.pins.get(e, 0) + 1
        return slot, ev

    def _fill(self, lc: LayerCache, e: int, slot: int, ev: threading.Event, decode: bool) -> None:
        """Read ``e`` into its reserved slot (I/O thread); failures reach the waiting forward."""
        staging = getattr(self._local, "staging", None)
        if staging is None:
            staging = self._local.staging = {}
        try:
            n = self._load(lc.layer, e, lc.weights(slot), staging)
        except BaseException as exc:  # noqa: BLE001
            with self.lock:
                self._failed[(lc.layer, e)] = exc
                lc.loading.pop(e, None)
                lc.slot_of.pop(e, None)
                lc.free.append(slot)
                ev.set()
            return
        with self.lock:
            lc.loading.pop(e, None)
            ev.set()
            lc.policy.insert(e)
        self._count_read(n, decode)

    def _count_read(self, n: int, decode: bool) -> None:
        with self.lock:
            self.bytes_read += n
            if decode:
                self.decode_bytes_read += n

    def _evict(self, lc: LayerCache, victim: int) -> int:
        """Remove ``victim`` (lock held); returns its slot."""
        slot = lc.slot_of.pop(victim)
        lc.policy.evict(victim)
        if victim in lc.prefetched:
            lc.prefetched.discard(victim)
            self.prefetch_wasted += 1
        return slot

    # ----- prefetch -----------------------------------------------------------------------------------
    def _predict(self, layer: int, hidden: torch.Tensor) -> None:
        """Cross-layer gate: the next MoE layer's router applied to this layer's router input."""
        nv = self.next_view.get(layer)
        if nv is None:
            return
        router = nv.router
        out = type(router).forward(router, hidden.to(router.weight.dtype))
        ids = out[2] if isinstance(out, tuple) else out
        if isinstance(out, tuple) and self.prefetch_top is not None:  # the most confident predictions only
            order = out[1].float().argsort(dim=-1, descending=True)[:, : self.prefetch_top]
            ids = ids.gather(1, order)
        pred = set(torch.unique(ids).tolist())
        nlc = self.layers[nv.index]
        tasks = []
        with self.lock:
            self._predicted[nv.index] = pred
            for e in sorted(pred):
                if e in nlc.slot_of:
                    nlc.policy.touch(e)  # keep predicted residents away from eviction
                elif nlc.policy.admit(e):
                    tasks.append(e)
        assert self._q is not None
        for e in tasks:
            self._q.put((nv.index, e, nlc.forwards, pred))

    def _prefetch_loop(self) -> None:
        assert self._q is not None
        staging: dict = {}
        while True:
            task = self._q.get()
            if task is None:
                return
            layer, e, forwards_at, pred = task
            lc = self.layers[layer]
            with self.lock:
                if lc.forwards != forwards_at or e in lc.slot_of:
                    self.prefetch_skipped += 1
                    continue
                if lc.free:
                    slot = lc.free.pop()
                else:
                    victim = lc.policy.victim([x for x in lc.evictable() if x not in pred])
                    if victim is None:
                        self.prefetch_skipped += 1
                        continue
                    slot = self._evict(lc, victim)
                lc.slot_of[e] = slot
                lc.loading[e] = ev = threading.Event()
                lc.prefetched.add(e)
                self.prefetch_issued += 1
            try:
                n = self._load(layer, e, lc.weights(slot), staging)
            finally:
                with self.lock:
                    lc.loading.pop(e, None)
                    ev.set()
                    lc.policy.insert(e)
            self._count_read(n, self._phase_decode)

    # ----- statistics ---------------------------------------------------------------------------------
    def stats(self, belady: bool = True) -> dict[str, Any]:
        """Hit rate, misses, bytes per token, prefetch precision/recall, stall time, tokens/s, and
        (``belady``) the decode misses relative to Belady's MIN on the same routing trace."""
        tot = LayerStats()
        for lc in self.layers.values():
            for f in vars(tot):
                setattr(tot, f, getattr(tot, f) + getattr(lc.stats, f))
        out: dict[str, Any] = {
            "policy": self.policy_name, "slots_per_layer": self.slots, "moe_layers": len(self.layers),
            "cache_bytes": sum(lc.nbytes() for lc in self.layers.values()), "budget_bytes": self.budget_bytes,
            "expert_bytes": max(self.store.expert_bytes.values()), "device": str(self.device),
            "requests": tot.requests, "hits": tot.hits, "misses": tot.misses,
            "hit_rate": tot.hits / tot.requests if tot.requests else None,
            "late_prefetch_hits": tot.late_prefetch,
            "decode_requests": tot.decode_requests, "decode_hits": tot.decode_hits,
            "decode_misses": tot.decode_misses,
            "decode_hit_rate": tot.decode_hits / tot.decode_requests if tot.decode_requests else None,
            "fetches": tot.misses + self.prefetch_issued,
            "bytes_read": self.bytes_read,
            "bytes_read_per_token": self.decode_bytes_read / self.decode_tokens if self.decode_tokens else None,
            "stall_s": round(self.stall_s, 4),
            "prefill_tokens": self.prefill_tokens, "decode_tokens": self.decode_tokens,
            "prefill_s": round(self.prefill_s, 4), "decode_s": round(self.decode_s, 4),
            "tokens_per_s": self.decode_tokens / self.decode_s if self.decode_s else None,
        }
        if self.prefetch:
            out["prefetch"] = {
                "issued": self.prefetch_issued, "used": self.prefetch_used, "wasted": self.prefetch_wasted,
                "skipped": self.prefetch_skipped,
                "precision": self.prefetch_used / self.prefetch_issued if self.prefetch_issued else None,
                "predictor_recall": self.pred_hits / self.pred_requests if self.pred_requests else None,
                "predictor_precision": self.pred_hits / self.pred_total if self.pred_total else None,
            }
        if belady and self.slots and tot.decode_requests:
            out["belady"] = self.belady_comparison()
        return out

    def belady_comparison(self) -> dict[str, Any]:
        """Replay the decode routing trace (per layer) through Belady's MIN with this cache's slots:
        warm (from the cache's contents at the first decode step, as the run) and cold (the analysis
        simulator, ``moekit.analysis.cache``, when present)."""
        warm = sum(belady_misses(self.trace[li], self.slots, self.warm_state.get(li, set()))
                   for li in self.trace)
        tot_dec = sum(lc.stats.decode_misses for lc in self.layers.values())
        fetches = tot_dec + self.prefetch_issued  # prefetch reads also move bytes
        res: dict[str, Any] = {"decode_misses": tot_dec, "belady_misses_warm": warm,
                               "miss_ratio_to_belady": tot_dec / warm if warm else None,
                               "decode_fetches": fetches, "fetch_ratio_to_belady": fetches / warm if warm else None}
        try:
            from moekit.analysis.cache import simulate_cache
        except ImportError:
            simulate_cache = None
        cold_b, cold_l = 0, 0
        for li, reqs in self.trace.items():
            if not reqs:
                continue
            if simulate_cache is not None and max(map(len, reqs)) <= self.slots:
                width = max(map(len, reqs))
                arr = np.full((len(reqs), width), -1, dtype=np.int64)
                for i, r in enumerate(reqs):
                    arr[i, : len(r)] = r
                E = self.layers[li].policy.num_experts
                cold_b += simulate_cache(arr, "belady", self.slots, num_experts=E)["misses"]
                cold_l += simulate_cache(arr, "lru", self.slots, num_experts=E)["misses"]
            else:
                cold_b += belady_misses(reqs, self.slots, set())
        res["belady_misses_cold"] = cold_b
        if simulate_cache is not None:
            res["simulated_lru_misses_cold"] = cold_l
        return res


def belady_misses(requests: list[list[int]], capacity: int, initial: set[int]) -> int:
    """Misses of Belady's MIN on a request stream (each step's experts requested together and all
    resident afterwards when they fit; evict the resident used farthest in the future)."""
    resident = set(list(initial)[:capacity]) if len(initial) > capacity else set(initial)
    n = len(requests)
    nxt: list[dict[int, int]] = [dict() for _ in range(n)]
    last: dict[int, int] = {}
    for t in range(n - 1, -1, -1):
        nxt[t] = dict(last)
        for e in requests[t]:
            last[e] = t
    misses = 0
    for t, req in enumerate(requests):
        need = set(req)
        miss = need - resident
        misses += len(miss)
        for e in miss:
            if len(resident) >= capacity:
                cands = resident - need
                if not cands:
                    continue
                victim = max(cands, key=lambda x: (nxt[t].get(x, n + 1), x))
                resident.discard(victim)
            resident.add(e)
    return misses


def _profile_counts(profile: Any, views: list) -> dict[int, np.ndarray]:
    """Per-layer expert request counts from a RoutingTrace, a path to one, or {layer: counts}."""
    if isinstance(profile, dict):
        return {int(k): np.asarray(v) for k, v in profile.items()}
    from moekit.trace import RoutingTrace

    trace = RoutingTrace.load(profile) if not hasattr(profile, "ids") else profile
    out = {}
    for v in views:
        if v.index not in trace.layers:
            continue
        ids = np.asarray(trace.ids[trace.layer_pos(v.index)])
        ids = ids[ids >= 0]
        out[v.index] = np.bincount(ids, minlength=v.num_experts)
    return out


@contextlib.contextmanager
def offload(lm: LoadedModel, cache_mb: float | None = None, policy: str = "lru+prefetch", slots: int | None = None,
            device: str | torch.device | None = None, profile: Any = None, bypass_page_cache: bool = True,
            store: ExpertStore | None = None, io_threads: int = 2,
            prefetch_top: int | None = None) -> Iterator[OffloadEngine]:
    """Run every generation on ``lm`` inside the block with only a cache of experts resident.

    ``cache_mb``: byte budget of the cache (default: 2·k experts per layer); ``slots``: experts per layer
    instead of a budget; ``policy``: one of ``POLICIES`` (``lru+prefetch`` by default); ``device``: the
    fast tier (default: the model's device); ``profile``: frequency source of the ``static`` policy (a
    RoutingTrace, its path, or {layer: counts}); ``io_threads``: threads reading a forward's cached misses
    while its hits are computed and the uncached ones in parallel (0: one read at a time);
    ``prefetch_top``: prefetch only each token's most confident predictions (default: all k).  Yields the engine; ``engine.stats()`` has the
    metrics.
    """
    for v in lm.moe:
        v.require_standard_bank("offloading")
    st = store or store_for(lm, bypass_page_cache=bypass_page_cache)
    engine = OffloadEngine(lm, st, policy=policy, cache_mb=cache_mb, slots=slots, device=device, profile=profile,
                           io_threads=io_threads, prefetch_top=prefetch_top)
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


__all__ = ["IMPL_NAME", "OffloadEngine", "belady_misses", "offload"]
