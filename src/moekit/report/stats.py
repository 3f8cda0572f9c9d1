"""The report's statistics: checks that a trace fits the model, the ``summarize`` result, the super-expert
profiling pass and the cache size that reaches a hit-rate fraction (``build_stats``)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from moekit.data.corpus import interleave_domains
from moekit.errors import MoekitError

DEFAULT_PROFILE_TOKENS = 8192
DEFAULT_CHECK_TOKENS = 4096


# ------------------------------------------------------------------------------------------ checks
def check_trace_matches(lm: Any, trace: Any) -> None:
    """Raise MoekitError (one line) when ``trace`` was not recorded from a model shaped like ``lm``:
    architecture, MoE layer indices and experts per layer must agree."""
    meta = trace.meta
    src = meta.get("model") or "an unknown model"
    arch = meta.get("architecture")
    if arch is not None and arch != lm.moe.model_type:
        raise MoekitError(f"trace was recorded from {src} ({arch}), not from {lm.name} ({lm.moe.model_type})")
    if list(trace.layers) != list(lm.moe.indices):
        raise MoekitError(f"trace was recorded from {src} with MoE layers {list(trace.layers)}, but {lm.name} "
                          f"has MoE layers {list(lm.moe.indices)}")
    ne = [v.num_experts for v in lm.moe]
    if list(trace.num_experts) != ne:
        raise MoekitError(f"trace was recorded from {src} with experts per layer {list(trace.num_experts)}, "
                          f"but {lm.name} has {ne}")


def check_trace_nonempty(trace: Any) -> None:
    """Raise MoekitError when ``trace`` has no tokens or no MoE layers."""
    ids = np.asarray(trace.ids)
    if ids.ndim != 3 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise MoekitError("the trace is empty (no tokens recorded); nothing to report")


# --------------------------------------------------------------------------------------- statistics
def cache_size_for_fraction(cache: dict[str, Any], fraction: float = 0.9) -> dict[str, Any]:
    """Per scope: the cache size (in multiples of k, linearly interpolated between the tested sizes)
    at which each policy first reaches ``fraction`` of Belady MIN's hit rate at the largest tested
    size; None when a policy never gets there.  ``target`` is that hit rate."""
    out: dict[str, Any] = {}
    mult = [float(m) for m in cache["multipliers"]]
    for scope in ("layer", "global"):
        tab = cache.get(scope)
        if not tab or tab.get("belady") is None:
            continue
        target = fraction * float(tab["belady"]["hit_rate"][-1])
        res: dict[str, Any] = {"fraction": fraction, "target": target}
        for pol in ("lru", "lfu", "static", "belady", "belady_bypass"):
            if pol not in tab:
                continue
            hit = [np.nan if h is None else float(h) for h in tab[pol]["hit_rate"]]
            need = None
            for i, h in enumerate(hit):
                if h >= target:
                    if i == 0 or not np.isfinite(hit[i - 1]) or h == hit[i - 1]:
                        need = mult[i]
                    else:
                        need = mult[i - 1] + (target - hit[i - 1]) / (h - hit[i - 1]) * (mult[i] - mult[i - 1])
                    break
            res[pol] = need
        out[scope] = res
    return out


def super_experts(
    lm: Any,
    docs: Sequence,
    profile_tokens: int | None = DEFAULT_PROFILE_TOKENS,
    check_tokens: int | None = DEFAULT_CHECK_TOKENS,
    check: bool = True,
    seeds: Sequence[int] = (0, 1, 2),
) -> dict[str, Any]:
    """Profile max |down_proj output| per expert, detect super experts and run the zeroing check.

    Documents are interleaved across domains first (:func:`interleave_domains`), so the token caps
    of the profile and the check sample every domain.
    When nothing is detected the check is run on the single expert with the largest maximum
    (``checked`` says which experts were zeroed and ``detected`` whether they are super experts)."""
    from moekit.analysis.super_experts import detect_super_experts
    from moekit.report.profiling import profile_expert_max, super_expert_check

    t0 = time.perf_counter()
    docs = interleave_domains(docs)
    maxima = profile_expert_max(lm, docs, max_tokens=profile_tokens)
    layers = list(lm.moe.indices)
    found = detect_super_experts(maxima)
    n_keep = max(1, int(np.floor(0.75 * maxima.shape[0])))  # the detector's default layer_fraction
    fin = maxima[np.isfinite(maxima)]
    median = float(np.median(fin)) if fin.size else float("nan")
    flat = [(float(maxima[li, e]), li, e) for li in range(maxima.shape[0]) for e in range(maxima.shape[1])
            if np.isfinite(maxima[li, e])]
    flat.sort(reverse=True)
    top = [{"layer": lm.moe.layer_of(li), "expert": e, "max_abs": v, "over_median": v / median if median else None,
            "super": (li, e) in set(found)} for v, li, e in flat[:8]]
    detected = [lm.moe.ref(li, e) for li, e in found]  # decreasing maximum
    out: dict[str, Any] = {
        "layers": layers, "max_abs": maxima.tolist(), "median": median,
        "detected": [str(r) for r in detected], "detected_pos": [[li, e] for li, e in found],
        "top": top, "check": None, "profile_tokens": profile_tokens,
        "candidates": int(np.isfinite(maxima[:n_keep]).sum()), "candidate_layers": layers[:n_keep],
    }
    if check and flat:
        zero = detected or [lm.moe.ref(flat[0][1], flat[0][2])]
        res = super_expert_check(lm, docs, zero, seeds=seeds, max_tokens=check_tokens)
        res["detected"] = bool(found)
        res["tokens"] = check_tokens
        out["check"] = res
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def model_summary(lm: Any | None, trace: Any) -> dict[str, Any]:
    """The model description (``moekit inspect``'s ``describe``) or, without a model, the trace's meta."""
    if lm is not None:
        from moekit.models.summary import describe  # the one description of a model

        return describe(lm)
    meta = trace.meta
    return {"model": meta.get("model"), "architecture": meta.get("architecture"),
            "moe_layers": trace.num_layers,
            "layers": [{"layer": li, "num_experts": e, "top_k": k}
                       for li, e, k in zip(trace.layers, trace.num_experts, trace.top_k, strict=True)]}


def build_stats(
    lm: Any | None,
    trace: Any,
    docs: Sequence | None = None,
    layer: int | None = None,
    stats: dict[str, Any] | None = None,
    model_info: dict[str, Any] | None = None,
    profile_tokens: int | None = DEFAULT_PROFILE_TOKENS,
    check_tokens: int | None = DEFAULT_CHECK_TOKENS,
    super_check: bool = True,
) -> dict[str, Any]:
    """Everything the report shows, JSON-serialisable: ``summary`` (``moekit.analysis.summarize``;
    pass ``stats`` to reuse one), ``model`` (description), ``cache_90`` (see
    :func:`cache_size_for_fraction`), ``super_experts`` (None without a model and documents) and
    ``timings``."""
    from moekit.analysis.summary import jsonable, summarize

    check_trace_nonempty(trace)
    if lm is not None:
        check_trace_matches(lm, trace)
    if layer is not None:
        trace.layer_pos(layer)  # clear error for a layer that is not an MoE layer
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if stats is None or (layer is not None and stats.get("coactivation", {}).get("layer") != layer):
        stats = summarize(trace, coactivation_layer=layer)
    timings["analysis"] = round(time.perf_counter() - t0, 1)
    out: dict[str, Any] = {
        "summary": stats,
        "model": model_info if model_info is not None else model_summary(lm, trace),
        "cache_90": cache_size_for_fraction(stats["cache"]) if stats.get("cache") else None,
        "super_experts": None,
        "has_probs": trace.probs is not None,
    }
    if lm is not None and docs:
        out["super_experts"] = super_experts(lm, docs, profile_tokens=profile_tokens, check_tokens=check_tokens,
                                             check=super_check)
        timings["super_experts"] = out["super_experts"]["seconds"]
    out["timings"] = timings
    return jsonable(out)
