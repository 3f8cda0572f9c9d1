"""Expert placement under a memory budget: ``moekit.load(spec, max_memory="6GB")``.

Everything is resident when the model fits the budget; otherwise the non-expert weights are resident and
the routed experts are served by the expert store + cache (``OffloadEngine``, started for the model's
lifetime), all through the same model map, so ``route``, ``record`` and every method run unchanged.

Budget: peak RSS of the process.  ``RESERVE`` (the interpreter with torch and transformers) plus
``ACTIVATION_SHARE`` of the budget (activations, logits, scratch) are set aside; the rest holds the
resident weights and, when offloaded, the expert cache.
"""

from __future__ import annotations

import math
import os
import re

import torch

from moekit.errors import MoekitError
from moekit.formats.tokenizer import load_tokenizer_from
from moekit.models.loading import (
    DEFAULT_MODEL,
    LoadedModel,
    bank_keys,
    footprint,
    load_structure,
    read_weights,
)
from moekit.models.loading import load as load_resident
from moekit.models.moe_map import build_moe_map

RESERVE = 600 << 20
ACTIVATION_SHARE = 0.15
_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int | float) -> int:
    """``"6GB"``, ``"512MB"``, ``"1.5GiB"`` or a number of bytes → bytes (a MoekitError for anything else)."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if m is None or m[2].upper() not in _UNITS:
            raise MoekitError(f"bad memory size {text!r}: write e.g. 6GB, 512MB or 1.5GiB")
        value, unit = float(m[1]), m[2].upper()
    n = value * _UNITS[unit]
    if not math.isfinite(n) or n <= 0:
        raise MoekitError(f"memory size must be positive and finite, got {text!r}")
    if n > 2**50:
        raise MoekitError(f"memory size {text!r} is implausibly large")
    return int(n)


def plan_budget(lm_meta: LoadedModel, budget: int, packed: dict[str, int] | None = None) -> dict:
    """How ``lm_meta`` (structure only) fits ``budget`` bytes: ``resident`` (all weights in memory) or the
    expert cache bytes left when only the non-expert weights are resident. ``packed``: expert banks (state-dict
    key → bytes) that stay packed int4 in memory and in the cache slots (``packed_experts``), sized as such instead
    of as their float weights."""
    packed = packed or {}
    fp = footprint(lm_meta)
    keys = bank_keys(lm_meta.model, lm_meta.moe)
    saved = 0
    for v in lm_meta.moe:
        for p, key in keys[v.index].items():
            if key in packed:
                saved += getattr(v.experts, p).numel() * getattr(v.experts, p).element_size() - packed[key]
    fp = {"total": fp["total"] - saved, "experts": fp["experts"] - saved, "resident": fp["resident"]}
    usable = budget - RESERVE - int(ACTIVATION_SHARE * budget)
    views = list(lm_meta.moe)
    per_slot = 0
    for v in views:
        for p, key in keys[v.index].items():
            t = getattr(v.experts, p)
            if t.dim() >= 1 and t.shape[0] == v.num_experts:
                per_slot += packed[key] // v.num_experts if key in packed else t[0].numel() * t.element_size()
    min_cache = per_slot * max(v.top_k for v in views) if views else 0
    return {"budget": budget, "usable": usable, **fp, "resident_all": fp["total"] <= usable,
            "cache_bytes": usable - fp["resident"], "min_cache_bytes": min_cache,
            "needed_min": fp["resident"] + min_cache + RESERVE + int(ACTIVATION_SHARE * budget)}


def load(spec: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype | str | None = "auto",
         device: str | torch.device = "cpu", with_tokenizer: bool = True, max_memory: str | int | None = None,
         policy: str = "lru+prefetch", distributed_config=None, packed_experts: bool = False) -> LoadedModel:
    """Load ``spec`` (hub id, local directory or ``moekit:<name>``) in eval mode and map its experts.

    ``dtype``: ``"auto"`` keeps the checkpoint's. ``max_memory`` (bytes or ``"6GB"``): the process's peak
    memory to stay under; experts are offloaded (served from the checkpoint through an expert cache with
    ``policy``) when the whole model does not fit. ``lm.engine`` is then the running ``OffloadEngine``.
    ``distributed_config``: see ``moekit.models.load`` (not with ``max_memory``). ``packed_experts``: a moekit
    int4 quantized checkpoint's experts stay packed, run by moekit's int4 kernel: in memory
    (``moekit.models.quantized.load_quantized``) or, offloaded, in the expert cache's slots (which then hold ~3.8x
    the experts of bf16 slots in the same budget).
    """
    if max_memory is None:
        return load_resident(spec, dtype=dtype, device=device, with_tokenizer=with_tokenizer,
                             distributed_config=distributed_config, packed_experts=packed_experts)
    if distributed_config is not None:
        raise MoekitError("give max_memory or distributed_config, not both")
    budget = parse_size(max_memory)
    from moekit.formats.quantized import is_quantized_checkpoint
    from moekit.malloc import return_freed_memory

    return_freed_memory()

    meta = load_structure(spec, dtype)
    if packed_experts and not (meta.path is not None and is_quantized_checkpoint(meta.path)):
        raise MoekitError(f"{meta.name}: packed experts need a moekit quantized checkpoint (moekit quantize --bits 4)")
    plan = plan_budget(meta, budget, _packed_banks(meta.path) if packed_experts else None)
    if meta.path is not None and is_quantized_checkpoint(meta.path):
        # quantized experts are dequantized when loaded whole: offload them whenever they do not fit
        if plan["resident_all"]:
            lm = load_resident(spec, dtype=dtype, device=device, with_tokenizer=with_tokenizer,
                               packed_experts=packed_experts)
            lm.activation_bytes = int(ACTIVATION_SHARE * budget)
            return lm
    elif plan["resident_all"]:
        from moekit.formats import Checkpoint

        ckpt = Checkpoint(meta.path)
        try:  # read tensor by tensor into the model: no mmap, no transient second copy
            read_weights(meta.model, ckpt)
        finally:
            ckpt.close()
        meta.model.to(device)
        meta.moe = build_moe_map(meta.model)
        meta.tokenizer = load_tokenizer_from(meta.path) if with_tokenizer else None
        meta.activation_bytes = int(ACTIVATION_SHARE * budget)
        return meta
    if plan["cache_bytes"] < plan["min_cache_bytes"]:
        raise MoekitError(
            f"--max-memory {_gb(budget)} is too small for {meta.name}: its non-expert weights take "
            f"{_gb(plan['resident'])} and an expert cache needs {_gb(plan['min_cache_bytes'])} more; "
            f"give at least {_gb(plan['needed_min'] * 1.05)}")
    del meta
    from moekit.serve.engine import OffloadEngine
    from moekit.serve.store import load_offloaded, store_for

    lm = load_offloaded(spec, dtype=dtype, device=device, with_tokenizer=with_tokenizer, packed_experts=packed_experts)
    engine = OffloadEngine(lm, store_for(lm), policy=policy, cache_mb=plan["cache_bytes"] / 2**20)
    lm.engine = engine.start()
    lm.activation_bytes = int(ACTIVATION_SHARE * budget)
    return lm


def _packed_banks(path) -> dict[str, int]:
    """Bytes of the expert banks of quantized checkpoint ``path`` that ``packed_experts`` keeps packed int4."""
    from moekit.formats.quantized import packed_bank_bytes, read_quant_meta
    from moekit.models.quantized import packed_int4_banks

    names = [n for bank in packed_int4_banks(read_quant_meta(path)).values() for n in bank]
    return packed_bank_bytes(path, names)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}GB"
