"""Super-expert detection from recorded activation maxima (the pure part).

Source: Su et al. 2025, "Unveiling Super Experts in Mixture-of-Experts Large Language Models"
(and its code): profile max |down_proj output| per expert on calibration text; an expert is "super"
when its maximum is above the 99.5th percentile of all experts' maxima and above 1/10 of the largest
one, counting only the first 75% of the layers (the last layers produce large outputs for other
reasons).  The profiling pass (hooks on down_proj) and the zeroing check live outside this package.
"""

from __future__ import annotations

import numpy as np

from moekit.errors import MoekitError


def detect_super_experts(
    max_abs_out: np.ndarray,
    layer_fraction: float = 0.75,
    percentile: float = 99.5,
    rel: float = 0.1,
    stats_over_all_layers: bool = False,
) -> list[tuple[int, int]]:
    """Super experts as ``(layer_pos, expert)`` pairs, sorted by decreasing activation maximum (``layer_pos``
    is the MoE position: ``MoEMap.ref(layer_pos, expert)`` names the expert).

    ``max_abs_out`` is ``[L, E]`` (MoE-layer position, expert); NaN marks an expert that never
    received a token.  Only layer positions ``< max(1, floor(layer_fraction * L))`` are candidates.
    The percentile (numpy's default linear interpolation) and the global maximum are taken over the
    candidate layers' experts, or over all layers with ``stats_over_all_layers``.  An expert is super
    when its value is strictly above both the percentile and ``rel * global max``.
    """
    a = np.asarray(max_abs_out, dtype=np.float64)
    if a.ndim != 2 or a.size == 0:
        raise MoekitError(f"detect_super_experts expects a non-empty [layers, experts] array, got {a.shape}")
    n_layers = a.shape[0]
    n_keep = max(1, int(np.floor(layer_fraction * n_layers)))
    cand = a[:n_keep]
    pool = a if stats_over_all_layers else cand
    vals = pool[np.isfinite(pool)]
    if vals.size == 0:
        return []
    thr = max(float(np.percentile(vals, percentile)), rel * float(vals.max()))
    hit = np.isfinite(cand) & (cand > thr)
    li, ei = np.nonzero(hit)
    order = np.lexsort((ei, li, -cand[li, ei]))
    return [(int(li[i]), int(ei[i])) for i in order]
