"""Per-layer expert load and router entropy.

Sources: load fraction and the coefficient of variation of expert load follow Shazeer et al. 2017
("Outrageously Large Neural Networks", the CV-squared importance/load loss) and Fedus et al. 2022
(Switch Transformer, fraction of tokens per expert); max/mean is the "max violation" used by
DeepSeek-V3's auxiliary-loss-free balancing paper (Wang et al. 2024).  Router entropy is the mean
Shannon entropy of the per-token router distribution (e.g. Zoph et al. 2022, ST-MoE analysis).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moekit.analysis._common import as_ids
from moekit.errors import MoekitError


def expert_load(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """Selections per expert: ``counts[e]`` = number of (token, slot) entries equal to ``e``.

    ``ids`` may have any shape (e.g. ``[N, K]`` for one layer); ``-1`` entries are ignored.
    """
    arr = as_ids(ids, num_experts).ravel()
    return np.bincount(arr[arr >= 0], minlength=num_experts).astype(np.int64)


def load_stats(ids: np.ndarray, num_experts: int) -> dict[str, Any]:
    """Load-balance statistics of one layer's selections.

    Returns ``counts`` (list), ``fraction`` (counts / total selections), ``cv`` (population standard
    deviation / mean of the counts), ``max_over_mean``, ``entropy`` (nats, of the load distribution
    ``fraction``), ``entropy_norm`` (entropy / log E; 1 = perfectly balanced), ``dead`` (experts
    never selected) and ``total``.  With no selections at all the ratios are NaN.
    """
    counts = expert_load(ids, num_experts)
    total = int(counts.sum())
    if total == 0:
        nan = float("nan")
        return {"counts": counts.tolist(), "fraction": [nan] * num_experts, "cv": nan,
                "max_over_mean": nan, "entropy": nan, "entropy_norm": nan, "dead": num_experts, "total": 0}
    frac = counts / total
    mean = counts.mean()
    nz = frac[frac > 0]
    ent = float(-(nz * np.log(nz)).sum())
    return {
        "counts": counts.tolist(),
        "fraction": frac.tolist(),
        "cv": float(counts.std() / mean),
        "max_over_mean": float(counts.max() / mean),
        "entropy": ent,
        "entropy_norm": float(ent / np.log(num_experts)) if num_experts > 1 else 1.0,
        "dead": int((counts == 0).sum()),
        "total": total,
    }


def router_entropy(probs: np.ndarray, axis: int = -1) -> float:
    """Mean over tokens of the Shannon entropy (nats) of the router distribution ``probs`` ``[..., E]``.

    Rows are used as given (not renormalised); ``0 log 0 = 0``.  Computed in float64 in chunks so a
    float16 ``[L, N, E]`` array is never copied whole.
    """
    p = np.asarray(probs)
    if p.size == 0:
        raise MoekitError("router_entropy: empty probability array")
    p = np.moveaxis(p, axis, -1).reshape(-1, p.shape[axis])
    total = 0.0
    step = 1 << 16
    for s in range(0, p.shape[0], step):
        q = p[s : s + step].astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            total += float(-np.where(q > 0, q * np.log(q), 0.0).sum())
    return total / p.shape[0]


def layer_summary(trace: Any) -> list[dict[str, Any]]:
    """One row per MoE layer of a ``RoutingTrace``: decoder layer index, E, k, cv, max/mean, load
    entropy, dead experts and (when the trace has ``probs``) mean router entropy."""
    rows = []
    ne = trace.num_experts
    tk = trace.top_k
    for i, layer in enumerate(trace.layers):
        st = load_stats(np.asarray(trace.ids[i]), ne[i])
        row = {
            "layer": int(layer),
            "num_experts": int(ne[i]),
            "top_k": int(tk[i]),
            "cv": st["cv"],
            "max_over_mean": st["max_over_mean"],
            "load_entropy": st["entropy"],
            "load_entropy_norm": st["entropy_norm"],
            "dead": st["dead"],
            "router_entropy": None,
        }
        if trace.probs is not None:
            row["router_entropy"] = router_entropy(np.asarray(trace.probs[i]))
        rows.append(row)
    return rows
