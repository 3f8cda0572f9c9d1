"""Offloaded generation: every expert computation of a model goes through an expert cache.

``offload(lm, ...)`` registers an experts implementation with transformers (``moekit_offload``) and
switches ``lm.model`` to it; each experts forward runs ``moekit.nn.dispatch.expert_forward_provided`` with this
engine as its per-expert weight provider: the cache (``serve.cache``: policy + slot state machine) says which
experts are resident, the I/O side (``serve.io``) reads the others from the store (slow tier) on its threads
while the hits are computed, and ``serve.stats`` counts.  The per-expert matmuls and the weighting are those of
the model's own implementation (transformers' ``grouped_mm``, or moekit's), so greedy generation yields the
tokens of the fully loaded model for every policy.  Anything that runs the model inside the ``with`` block
(``moekit.generation.stream``, the server, a plain forward) is offloaded.

(Over 400 lines: it is the one place where the cache's states, the I/O threads, the prefetch thread and the
compute meet, and the locking that orders them is easier to check in one file.)
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from moekit.errors import MoekitError
from moekit.formats.quantized import INT4_BUFFERS
from moekit.models.loading import LoadedModel
from moekit.nn.dispatch import expert_forward
from moekit.nn.fused_decode import EXPERTS_PROVIDER, SlotBank, swapped_forward
from moekit.nn.int4_experts import expert_forward_int4
from moekit.nn.provided import ExpertWeights, decodes_by_gemv, expert_forward_parts, expert_forward_provided
from moekit.serve.cache import POLICIES, LayerCache, Policy
from moekit.serve.io import ExpertIO
from moekit.serve.stats import EngineCounters, RequestLog, summary
from moekit.serve.store import ExpertStore, MappedExpert, store_for

IMPL_NAME = "moekit_offload"
#: whether a decode miss computed in place from the page cache is also copied into a slot (in the background):
ADMIT_MAPPED = {
    "repeat": "only when the expert missed within the last max(2, slots // k) forwards of its layer too",
    "always": "every such miss, like any other miss",
    "never": "never: the cache fills from prefetches and from misses read from storage only",
}


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


class OffloadEngine:
    """Expert cache + store + prefetcher + statistics for one model (see ``offload``)."""

    def __init__(self, lm: LoadedModel, store: ExpertStore, policy: str = "lru+prefetch",
                 cache_mb: float | None = None, slots: int | None = None, device: str | torch.device | None = None,
                 profile: Any = None, io_threads: int = 2, prefetch_top: int | None = None,
                 zero_copy: bool = True, admit_mapped: str = "repeat") -> None:
        self.lm = lm
        self.io_threads = io_threads
        self.prefetch_top = prefetch_top
        self.store = store
        self.policy_name = policy
        policy_cls: type[Policy] = POLICIES.get(policy)
        self.prefetch = bool(policy_cls.prefetch)
        self.device = torch.device(device) if device is not None else lm.device
        #: decode misses in the page cache computed from a mapping of the checkpoint (CPU fast tier only)
        self.zero_copy = bool(zero_copy and getattr(store, "zero_copy", False) and self.device.type == "cpu")
        if admit_mapped not in ADMIT_MAPPED:
            raise MoekitError(f"admit_mapped must be one of {', '.join(ADMIT_MAPPED)}, got {admit_mapped!r}")
        #: whether such a miss is also copied into a slot (in the background), see ``ADMIT_MAPPED``
        self.admit_mapped = admit_mapped
        self._mapped_at: dict[tuple[int, int], int] = {}  # (layer, expert) → the layer's forward of its last such miss
        self.views = list(lm.moe)
        for v in self.views:
            v.require_standard_bank("offloading")
        self._top_k = max((v.top_k for v in self.views), default=1)
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
        caps = policy_cls.layer_capacities(n_slots, len(self.views), max(v.num_experts for v in self.views),
                                           max(v.top_k for v in self.views))
        self.budget_bytes = int(cache_mb * 2**20) if cache_mb is not None else n_slots * per_slot
        profiles = _profile_counts(profile, self.views) if profile is not None else {}
        self.lock = threading.Lock()
        self.layers: dict[int, LayerCache] = {}
        for v, cap in zip(self.views, caps, strict=True):
            cap = min(cap, v.num_experts)
            pol = policy_cls(cap, v.num_experts, profiles.get(v.index))
            self.layers[v.index] = LayerCache(v.index, cap, store.shapes(v.index), self.device, pol)
        self.io = ExpertIO(store, self.device, io_threads)
        self.counters = EngineCounters()
        self._failed: dict[tuple[int, int], BaseException] = {}
        self._ew: dict[int, ExpertWeights] = {}
        self._predicted: dict[int, set[int]] = {}
        self.logs: dict[int, RequestLog] = {v.index: RequestLog() for v in self.views}
        self.warm_state: dict[int, set[int]] = {}
        self._phase_decode = False
        self._cur_tokens = 0
        self._hooks: list = []
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
            setattr(v.experts, EXPERTS_PROVIDER, _LayerExperts(self, self.layers[v.index]))
        model.set_experts_implementation(IMPL_NAME)
        self._hooks = [model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
                       model.register_forward_hook(self._post_forward)]
        self.io.start(self._prefetch_one if self.prefetch else None)
        return self

    def set_experts_implementation(self, impl: str) -> None:
        """Compute the offloaded experts as the experts implementation ``impl`` does, and return the model to it
        when the engine stops: ``"moekit"`` (moekit.nn's dispatch; its decode kernel then runs on the cache's slots,
        as fast as on resident weights) or transformers' (per-expert matmuls, summed as ``grouped_mm`` does). For a
        running engine (``moekit.load(max_memory=)``), where ``model.set_experts_implementation`` would unplug it."""
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        if impl == "moekit":
            from moekit.nn.dispatch import register_with_transformers

            register_with_transformers()
        if impl == IMPL_NAME or (impl != "eager" and impl not in ALL_EXPERTS_FUNCTIONS):
            raise MoekitError(f"unknown experts implementation {impl!r} to compute the offloaded experts with")
        self._prev_impl = impl

    def stop(self) -> None:
        self.io.stop()
        self._ew.clear()
        for h in self._hooks:
            h.remove()
        self._hooks = []
        model = self.lm.model
        for v in self.views:
            for attr in ("_moekit_offload_engine", "_moekit_layer", EXPERTS_PROVIDER):
                if hasattr(v.experts, attr):
                    delattr(v.experts, attr)
        if self._prev_impl is not None:
            model.set_experts_implementation(self._prev_impl)
        with self.lock:  # free the fast tier; the statistics stay readable
            for lc in self.layers.values():
                lc.release_memory()

    def _pre_forward(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        n = int(ids.shape[-1]) if isinstance(ids, torch.Tensor) else 0
        self._phase_decode = n == 1
        self._cur_tokens = n
        self._t0 = time.perf_counter()

    def _post_forward(self, module, args, output) -> None:
        dt = time.perf_counter() - self._t0
        c = self.counters
        if self._phase_decode:
            c.decode_tokens += self._cur_tokens
            c.decode_s += dt
        else:
            c.prefill_tokens += self._cur_tokens
            c.prefill_s += dt

    # ----- the experts forward ------------------------------------------------------------------------
    @torch.no_grad()
    def experts_forward(self, mod: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
        layer = mod._moekit_layer
        lc = self.layers[layer]
        decode = top_k_index.shape[0] == 1
        if self.prefetch and decode:
            self._predict(layer, hidden)
        has_gate = bool(getattr(mod, "has_gate", True))
        up = "gate_up_proj" if has_gate else "up_proj"
        names = (up, "down_proj", up + "_bias", "down_proj_bias")
        used: list[int] = []
        int4 = INT4_BUFFERS[0] in lc.bank  # packed int4 slots (QuantizedFileStore's packed_int4)

        def provide(experts: list[int]) -> Iterator[tuple[int, ExpertWeights]]:
            used.extend(experts)
            bounds = set(experts)
            order = [e for e in top_k_index[0].tolist() if e in bounds] if decode else None
            for e, w in self._provide(lc, experts, decode, order=order):
                ew = self._ew.get(id(w))  # slot and scratch dicts are long-lived: wrap each once
                if ew is None:
                    ew = self._ew[id(w)] = ExpertWeights(w[names[0]], w[names[1]], w.get(names[2]), w.get(names[3]))
                yield e, ew

        gate_fn = mod._apply_gate if has_gate and hasattr(mod, "_apply_gate") else None
        post_fn = mod.post_expert_norm if getattr(mod, "has_post_expert_norm", False) else None
        act = getattr(mod, "act_fn", torch.nn.functional.silu)
        transposed = bool(getattr(mod, "is_transposed", False))
        if int4:
            return self._forward_int4(lc, hidden, top_k_index, top_k_weights, names, act, has_gate, gate_fn, post_fn)
        if decode and self._prev_impl == "moekit" and lc.slots:
            # the model ran moekit.nn's dispatch: run its decode kernel on the slot bank itself (slots as expert ids),
            # the hits while the misses are read, then the misses: the same kernel on the same weights, the same numbers
            bank = lc.bank
            parts_w = ExpertWeights(bank[names[0]], bank[names[1]], bank.get(names[2]), bank.get(names[3]))
            if decodes_by_gemv(parts_w.gate_up):
                return self._decode_in_parts(lc, hidden, top_k_index, top_k_weights, parts_w, names, act,
                                             transposed, has_gate, gate_fn, post_fn)
            hit = self._all_resident(lc, top_k_index)  # another backend: on the slot bank when all k are resident
            if hit is not None:
                experts, slot_ids = hit
                try:
                    return expert_forward(hidden, slot_ids, top_k_weights, parts_w.gate_up, parts_w.down, act,
                                          b_gate_up=parts_w.gate_up_bias, b_down=parts_w.down_bias,
                                          transposed=transposed, has_gate=has_gate, gate_fn=gate_fn,
                                          post_fn=post_fn)
                finally:
                    with self.lock:
                        lc.release(experts, experts)
        try:
            return expert_forward_provided(
                hidden, top_k_index, top_k_weights, provide, act, transposed=transposed, has_gate=has_gate,
                gate_fn=gate_fn,
                post_fn=post_fn, combine="gemm" if self._prev_impl == "moekit" else "sum",
                num_experts=lc.policy.num_experts)
        finally:
            if used:
                with self.lock:
                    lc.release(used, top_k_index.reshape(-1).tolist())

    def _decode_in_parts(self, lc: LayerCache, hidden: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor, bank: ExpertWeights, names: tuple[str, ...], act: Any,
                         transposed: bool, has_gate: bool, gate_fn: Any, post_fn: Any) -> torch.Tensor:
        """One decode step with moekit's decode kernel on cache slots: the hits on the slot bank, then the misses
        whose bytes are in the OS page cache straight from a mapping of the checkpoint (zero-copy, while the other
        misses are read into claimed slots on the I/O threads), then prefetches in flight and those misses once
        read, then the misses the cache does not take, from scratch buffers. No weight is copied after its read."""
        row = top_k_index[0].tolist()
        num_experts = lc.policy.num_experts
        experts = [e for e in dict.fromkeys(row) if 0 <= e < num_experts]
        mapped = self._mapped_misses(lc, experts)
        with self.lock:
            plan, claimed, events = self._plan_claims(lc, sorted(experts), True, experts, experts,
                                                      skip=self._not_admitted(lc, mapped))
            hits = {e: lc.slot_of[e] for e in experts if plan[e] == "hit"}
        zero = {e: mapped[e] for e in experts if plan[e] == "miss" and e in mapped}
        fills = {e: self.io.submit(self._fill, lc, e, slot, ev, True) for e, (slot, ev) in claimed.items()}
        bypass = [e for e in experts if plan[e] == "miss" and e not in claimed and e not in zero]
        dtype, device = top_k_index.dtype, top_k_index.device
        if zero:
            self.counters.mapped(sum(me.nbytes for me in zero.values()), len(zero), True)

        def slot_ids(slot_of: dict[int, int], absent: int) -> torch.Tensor:
            return torch.tensor([[slot_of.get(e, absent) for e in row]], dtype=dtype, device=device)

        def parts() -> Iterator[tuple[torch.Tensor, ExpertWeights]]:
            if hits or not experts:  # (at least one part)
                yield slot_ids(hits, lc.slots), bank
            for e, me in zero.items():  # page-cache-resident misses: computed in place, mapped for this step only
                me.populate()
                w = me.weights
                yield slot_ids({e: 0}, 1), ExpertWeights(*(w[n].unsqueeze(0) if n in w else None for n in names))
            late: dict[int, int] = {}
            for e, ev in events.items():
                self._wait(lc, e, ev)
                late[e] = lc.slot_of[e]
            for e, fut in fills.items():
                if e in zero:  # admitted: its copy into the slot goes on in the background
                    continue
                t0 = time.perf_counter()
                fut.result()
                self.counters.stall(time.perf_counter() - t0)
                self._wait(lc, e, claimed[e][1])
                late[e] = claimed[e][0]
            if late:
                yield slot_ids(late, lc.slots), bank
            for e, w in self._scratch_reads(lc, bypass, True):
                one = ExpertWeights(*(w[n].unsqueeze(0) if n in w else None for n in names))
                yield slot_ids({e: 0}, 1), one

        try:
            return expert_forward_parts(hidden, top_k_weights, parts(), act, transposed=transposed,
                                        has_gate=has_gate, gate_fn=gate_fn, post_fn=post_fn)
        finally:
            for me in zero.values():
                me.release()
            with self.lock:
                lc.release(experts, row)

    def _forward_int4(self, lc: LayerCache, hidden: torch.Tensor, top_k_index: torch.Tensor,
                      top_k_weights: torch.Tensor, names: tuple[str, ...], act: Any, has_gate: bool, gate_fn: Any,
                      post_fn: Any) -> torch.Tensor:
        """A forward on packed int4 slots with moekit's int4 experts (``expert_forward_int4``: the int4 kernel per
        slot for a decode step, per expert groups for a prefill, as the in-memory packed model runs them): the
        experts the cache holds (hits, and misses once read into their slots) in one call on the slot bank, those it
        does not take each from its scratch buffers as they arrive (before the next read reuses them), the parts
        added in fp32. With every expert in a slot, the in-memory packed model's computation on the same codes."""
        decode = top_k_index.shape[0] == 1
        num_experts = lc.policy.num_experts
        valid = (top_k_index >= 0) & (top_k_index < num_experts)
        ids = torch.where(valid, top_k_index, num_experts)  # "no expert" as num_experts
        flat = top_k_index.reshape(-1).tolist()
        experts = sorted({e for e in flat if 0 <= e < num_experts})
        biases = {"b_gate_up": names[2], "b_down": names[3]}

        def run(part_ids: torch.Tensor, bank: dict[str, torch.Tensor]) -> torch.Tensor:
            return expert_forward_int4(
                hidden, part_ids, top_k_weights, tuple(bank[n] for n in INT4_BUFFERS), act, has_gate=has_gate,
                gate_fn=gate_fn, post_fn=post_fn, **{k: bank.get(n) for k, n in biases.items()})

        out: torch.Tensor | None = None
        in_slots: dict[int, int] = {}
        order = [e for e in flat if 0 <= e < num_experts] if decode else None
        try:
            for e, w in self._provide(lc, experts, decode, order=order):
                slot = lc.slot_of.get(e)
                if slot is not None and w is lc.weights(slot):
                    in_slots[e] = slot
                    continue
                part = run(torch.where(ids == e, 0, 1), {n: t.unsqueeze(0) for n, t in w.items()}).float()
                out = part if out is None else out + part
            if in_slots or out is None:
                lut = torch.full((num_experts + 1,), lc.slots, dtype=ids.dtype, device=ids.device)
                for e, slot in in_slots.items():
                    lut[e] = slot
                bank_out = run(lut[ids], lc.bank)
                if out is None:
                    return bank_out
                out = out + bank_out.float()
            return out.to(hidden.dtype)
        finally:
            with self.lock:
                lc.release(experts, flat)

    def _not_admitted(self, lc: LayerCache, mapped: dict[int, MappedExpert]) -> set[int]:
        """Of this step's page-cache misses, those not to copy into a slot: none (``always``), all (``never``), or
        (``repeat``) those that did not also miss within the last ``max(2, slots // k)`` forwards of this layer: an
        expert asked for again soon is worth its copy, one asked for once is cheaper computed in place. Lock held."""
        if not mapped or self.admit_mapped == "always":
            return set()
        if self.admit_mapped == "never":
            return set(mapped)
        window = max(2, lc.slots // max(1, self._top_k))
        skip = set()
        for e in mapped:
            last = self._mapped_at.get((lc.layer, e))
            if last is None or lc.forwards - last > window:
                skip.add(e)
            self._mapped_at[(lc.layer, e)] = lc.forwards
        return skip

    def _mapped_misses(self, lc: LayerCache, experts: list[int]) -> dict[int, MappedExpert]:
        """The experts of this step absent from the cache whose bytes the OS page cache holds, as zero-copy views
        of the checkpoint (``ExpertStore.mapped``); none when zero-copy is off or the fast tier is not the CPU."""
        if not self.zero_copy:
            return {}
        out = {}
        for e in experts:
            if e not in lc.slot_of:  # (a hint without the lock: the plan decides)
                me = self.store.mapped(lc.layer, e)
                if me is not None:
                    out[e] = me
        return out

    def access(self, layer: int, experts: list[int], decode: bool = True) -> list[str]:
        """Request ``experts`` of ``layer`` as one forward would (without computing): ``"hit"``, ``"wait"``
        or ``"miss"`` per expert; for tests and trace replays."""
        lc = self.layers[layer]
        uniq = sorted(set(experts))
        kinds: list[str] = []
        try:
            for _ in self._provide(lc, uniq, decode, kinds, order=list(experts)):
                pass
        finally:
            with self.lock:
                lc.release(uniq, list(experts))
        return kinds

    def resident(self, layer: int) -> set[int]:
        """Experts of ``layer`` currently in the cache."""
        with self.lock:
            return self.layers[layer].resident()

    def _provide(self, lc: LayerCache, experts: list[int], decode: bool, kinds: list[str] | None = None,
                 order: list[int] | None = None) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """The weights of each of ``experts``: hits first, then prefetches in flight, then misses read into
        claimed slots on the I/O threads (started before the hits are computed), then those the cache does not
        take: in place from the page cache when it holds them (zero-copy), else read into scratch buffers, a few at
        a time in parallel. Pins are released by the caller.
        ``order``: the request in slot order (recorded for the replay; default ``experts``)."""
        with self.lock:
            plan, claimed, events = self._plan_claims(lc, experts, decode, order, experts)
        if kinds is not None:
            kinds.extend(plan[e] for e in experts)
        fills = {e: self.io.submit(self._fill, lc, e, slot, ev, decode) for e, (slot, ev) in claimed.items()}
        for e in experts:
            if plan[e] == "hit":
                yield e, lc.weights(lc.slot_of[e])
        for e in experts:
            if plan[e] == "wait":
                yield e, self._wait(lc, e, events[e])
        for e, fut in fills.items():
            t0 = time.perf_counter()
            fut.result()
            self.counters.stall(time.perf_counter() - t0)
            yield e, self._wait(lc, e, claimed[e][1])
        bypass = [e for e in experts if plan[e] == "miss" and e not in claimed]
        # zero-copy for decode only: a prefill's GEMMs on the checkpoint's unaligned bytes may round differently from
        # the same GEMMs on an aligned buffer (calibration statistics must not depend on the cache), and a prefill
        # reads each missing expert once per forward anyway
        mapped = self._mapped_misses(lc, bypass) if decode else {}
        if mapped:
            self.counters.mapped(sum(me.nbytes for me in mapped.values()), len(mapped), decode)
        for e, me in mapped.items():  # in the page cache: computed in place, mapped while this expert computes
            me.populate()
            try:
                yield e, me.weights
            finally:
                me.release()
        yield from self._scratch_reads(lc, [e for e in bypass if e not in mapped], decode)

    def _scratch_reads(self, lc: LayerCache, experts: list[int], decode: bool) -> Iterator[tuple[int, dict]]:
        """``(expert, weights)`` for misses the cache does not take, read into scratch buffers a few at a time in
        parallel (the time spent waiting for each counts as a stall)."""
        width = max(2, self.io_threads) if self.io.pool is not None else 1
        for i in range(0, len(experts), width):
            chunk = experts[i:i + width]
            futs = [self.io.submit(self._read_scratch, lc.layer, e, j, decode) for j, e in enumerate(chunk)]
            for e, fut in zip(chunk, futs, strict=True):
                t0 = time.perf_counter()
                w = fut.result()
                self.counters.stall(time.perf_counter() - t0)
                yield e, w

    def _plan_claims(
        self, lc: LayerCache, experts: list[int], decode: bool, order: list[int] | None, claim_order: list[int],
        skip: Any = (),
    ) -> tuple[dict[int, str], dict[int, tuple[int, threading.Event]], dict[int, threading.Event]]:
        """Under ``self.lock``: the plan of ``_lookup`` (hit / miss / wait per expert), a slot claimed for each miss
        the cache takes (in ``claim_order``; misses it refuses get none, and so do those in ``skip``) with the event
        its read will set, and the events of the experts already being read."""
        plan = self._lookup(lc, experts, decode, order)
        claimed: dict[int, tuple[int, threading.Event]] = {}
        for e in claim_order:
            if plan[e] == "miss" and e not in skip:
                ev = threading.Event()
                slot = lc.claim(e, ev)
                if slot is not None:
                    self._failed.pop((lc.layer, e), None)  # an earlier read's failure nobody waited for is history
                    claimed[e] = (slot, ev)
        return plan, claimed, {e: lc.loading[e] for e in claim_order if plan[e] == "wait"}

    def _lookup(self, lc: LayerCache, experts: list[int], decode: bool, order: list[int] | None) -> dict[int, str]:
        """``lc.lookup`` plus the engine's decode bookkeeping (warm state, request log, predictor); lock held."""
        plan = lc.lookup(experts, decode)
        if decode:
            if lc.layer not in self.warm_state:
                self.warm_state[lc.layer] = lc.resident()
            self.logs[lc.layer].append(list(dict.fromkeys(order)) if order is not None else experts)
            pred = self._predicted.pop(lc.layer, None)
            if pred is not None:
                c = self.counters
                c.pred_hits += len(pred & set(experts))
                c.pred_requests += len(experts)
                c.pred_total += len(pred)
        return plan

    def _all_resident(self, lc: LayerCache, ids: torch.Tensor) -> tuple[list[int], torch.Tensor] | None:
        """Decode fast path: when every expert of this one-token step is resident, count and pin them (as a
        lookup does) and return them with ``ids`` mapped to their slots (ids >= E to ``slots``: no expert)."""
        row = ids[0].tolist()
        num_experts = lc.policy.num_experts
        experts = [e for e in dict.fromkeys(row) if 0 <= e < num_experts]
        with self.lock:
            if any(e not in lc.slot_of or e in lc.loading for e in experts):
                return None
            self._lookup(lc, sorted(experts), True, experts)
            slots = [lc.slot_of[e] if 0 <= e < num_experts else lc.slots for e in row]
        return experts, torch.tensor([slots], dtype=ids.dtype, device=ids.device)

    def _wait(self, lc: LayerCache, e: int, ev: threading.Event) -> dict[str, torch.Tensor]:
        """The slot of ``e`` once its read (a prefetch or a fill) has finished; its failure is raised here."""
        t0 = time.perf_counter()
        ev.wait()
        with self.lock:
            err = self._failed.pop((lc.layer, e), None)
            if err is not None:
                raise err
            slot = lc.slot_of[e]
            lc.policy.touch(e)
        self.counters.stall(time.perf_counter() - t0)
        return lc.weights(slot)

    def _fill(self, lc: LayerCache, e: int, slot: int, ev: threading.Event, decode: bool) -> None:
        """Read ``e`` into its claimed slot (I/O or prefetch thread), finish the claim and wake its waiters; a
        failure reaches the waiting forward."""
        try:
            n = self.io.read(lc.layer, e, lc.weights(slot))
        except BaseException as exc:  # noqa: BLE001
            with self.lock:
                self._failed[(lc.layer, e)] = exc
                lc.finish(e, ok=False)
            ev.set()
            return
        with self.lock:
            lc.finish(e)
        ev.set()
        self.counters.read(n, decode)

    def _read_scratch(self, layer: int, e: int, j: int, decode: bool) -> dict[str, torch.Tensor]:
        """Read ``e`` into scratch set ``j`` (an expert the cache does not take)."""
        dst = self.io.scratch(layer, j)
        self.counters.read(self.io.read(layer, e, dst), decode)
        return dst

    # ----- prefetch -----------------------------------------------------------------------------------
    def _predict(self, layer: int, hidden: torch.Tensor) -> None:
        """Cross-layer gate: the next MoE layer's router applied to this layer's router input."""
        nv = self.next_view.get(layer)
        if nv is None:
            return
        router = nv.router
        # the router's class forward, without hooks or wrappers (routing controls); its fused one-token step when
        # moekit swapped it in for decode (the same numbers in one native call)
        fwd = swapped_forward(router) or type(router).forward.__get__(router)
        out = fwd(hidden.to(router.weight.dtype))
        ids = out[2] if isinstance(out, tuple) else out
        if isinstance(out, tuple) and self.prefetch_top is not None:  # the most confident predictions only
            order = out[1].float().argsort(dim=-1, descending=True)[:, : self.prefetch_top]
            ids = ids.gather(1, order)
        pred = set(ids.reshape(-1).tolist())
        nlc = self.layers[nv.index]
        tasks = []
        with self.lock:
            self._predicted[nv.index] = pred
            for e in sorted(pred):
                if e in nlc.slot_of:
                    nlc.policy.touch(e)  # keep predicted residents away from eviction
                elif nlc.policy.admit(e):
                    tasks.append(e)
        for e in tasks:
            self.io.enqueue((nv.index, e, nlc.forwards, pred))

    def _prefetch_one(self, task: tuple) -> None:
        """Prefetch thread: read a predicted expert into a slot, unless its layer already ran or it is there."""
        layer, e, forwards_at, pred = task
        lc = self.layers[layer]
        with self.lock:
            slot = None
            if lc.forwards == forwards_at and e not in lc.slot_of:
                ev = threading.Event()
                slot = lc.claim(e, ev, pin=False, keep=pred, prefetch=True)
            if slot is None:
                self.counters.prefetch_skipped += 1
                return
        self._fill(lc, e, slot, ev, self._phase_decode)

    # ----- statistics ---------------------------------------------------------------------------------
    def stats(self, belady: bool = True) -> dict[str, Any]:
        """Hit rate, misses, bytes per token, prefetch precision/recall, stall time, tokens/s, and
        (``belady``) the decode misses relative to Belady's MIN on the same routing requests."""
        with self.lock:
            return summary(self, belady)


class _LayerExperts:
    """One offloaded layer as the whole-layer decode step sees it (``moekit.nn.fused_decode.EXPERTS_PROVIDER``): the
    engine's experts forward for a step it hands over (a miss), and, under moekit's dispatch on float or packed int4
    slots, the slot bank with the cache's expert → slot table, on which the native step runs a step whose experts are
    all resident (the kernels ``_decode_in_parts`` and ``_forward_int4`` run on the same slots), then the
    bookkeeping that path's lookup does."""

    def __init__(self, engine: OffloadEngine, lc: LayerCache) -> None:
        self.engine, self.lc = engine, lc

    def forward(self, mod: nn.Module, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.engine.experts_forward(mod, hidden, ids, weights)

    def slot_bank(self) -> SlotBank | None:
        lc, bank = self.lc, self.lc.bank
        if self.engine._prev_impl != "moekit" or not lc.slots:
            return None
        if INT4_BUFFERS[0] in bank:  # packed int4 slots: the native step runs the int4 kernel on them
            return SlotBank(bank[INT4_BUFFERS[0]], bank[INT4_BUFFERS[3]], lc.table, self.engine.lock, bank)
        w1, w2 = bank.get("gate_up_proj"), bank.get("down_proj")
        if w1 is None or w2 is None or len(bank) != 2 or not decodes_by_gemv(w1):
            return None  # biases, another layout: the engine's forward
        return SlotBank(w1, w2, lc.table, self.engine.lock)

    def slot_hits(self, ids: torch.Tensor) -> None:
        """(The engine's lock held.) The step's experts were all resident and ran on their slots: the counts and
        recency of ``_decode_in_parts``'s lookup of an all-hit step, pinned and released at once."""
        row = ids[0].tolist()
        num_experts = self.lc.policy.num_experts
        experts = [e for e in dict.fromkeys(row) if 0 <= e < num_experts]
        self.engine._lookup(self.lc, sorted(experts), True, experts)
        self.lc.release(experts, row)

    def after_hits(self, hidden: torch.Tensor) -> None:
        """The prediction ``experts_forward`` makes before a decode step (prefetch of the next layer's experts)."""
        if self.engine.prefetch:
            self.engine._predict(self.lc.layer, hidden)


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
            device: str | torch.device | None = None, profile: Any = None, bypass_page_cache: bool = False,
            store: ExpertStore | None = None, io_threads: int = 2,
            prefetch_top: int | None = None, zero_copy: bool = True,
            admit_mapped: str = "repeat") -> Iterator[OffloadEngine]:
    """Run every generation on ``lm`` inside the block with only a cache of experts resident.

    ``cache_mb``: byte budget of the cache (default: 2·k experts per layer); ``slots``: experts per layer
    instead of a budget; ``policy``: one of ``POLICIES`` (``lru+prefetch`` by default); ``device``: the
    fast tier (default: the model's device); ``profile``: frequency source of the ``static`` policy (a
    RoutingTrace, its path, or {layer: counts}); ``io_threads``: threads reading a forward's cached misses
    while its hits are computed and the uncached ones in parallel (0: one read at a time);
    ``prefetch_top``: prefetch only each token's most confident predictions (default: all k); ``zero_copy``:
    compute a decode miss whose bytes are in the OS page cache from a mapping of the checkpoint instead of copying
    it (CPU, checkpoints that store experts in the model's layout and dtype); ``admit_mapped``: whether such a
    miss is also copied into the cache, in the background (``ADMIT_MAPPED``; default ``repeat``).
    Yields the engine; ``engine.stats()`` has the metrics.
    """
    for v in lm.moe:
        v.require_standard_bank("offloading")
    st = store or store_for(lm, bypass_page_cache=bypass_page_cache)
    engine = OffloadEngine(lm, st, policy=policy, cache_mb=cache_mb, slots=slots, device=device, profile=profile,
                           io_threads=io_threads, prefetch_top=prefetch_top, zero_copy=zero_copy,
                           admit_mapped=admit_mapped)
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


__all__ = ["ADMIT_MAPPED", "IMPL_NAME", "OffloadEngine", "offload"]
