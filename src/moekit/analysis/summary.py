"""``summarize``: the main metrics of a routing trace in one JSON-serialisable dict (for the report
and the demo).  Each entry comes from the function of this package named in its key."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from moekit.analysis.cache import MULTIPLIERS, cache_curves
from moekit.analysis.coactivation import coactivation, layer_affinity
from moekit.analysis.dynamic_k import dynamic_k_profile
from moekit.analysis.load import expert_load, layer_summary
from moekit.analysis.locality import SEG_LENS, sch_layers, srp_layers
from moekit.analysis.specialization import (
    domain_frequency,
    domain_mutual_information,
    shuffled_mi,
    top_experts_per_domain,
)
from moekit.errors import MoekitError


def jsonable(obj: Any) -> Any:
    """Nested numpy / float values as plain JSON types; NaN and infinities become None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


def summarize(
    trace: Any,
    coactivation_layer: int | None = None,
    seg_lens: Sequence[int] = SEG_LENS,
    sch_seg_lens: Sequence[int] = (16, 64),
    multipliers: Sequence[float] = MULTIPLIERS,
    cache: bool = True,
    seed: int = 0,
    sch_doc_stride: int = 1,
) -> dict[str, Any]:
    """Main metrics of a ``RoutingTrace``.

    Keys: ``model`` (id, layers, experts, top_k, tokens, documents), ``layers`` (``layer_summary``),
    ``load`` ([L][E] counts), ``coactivation`` (the chosen decoder layer, default the middle MoE layer,
    and its [E, E] counts), ``affinity`` (row-normalised [E, E] between that layer and the next, or
    None), ``domains`` (None without labels: names, per layer [D][E] frequency, MI and shuffled MI,
    top experts by lift), ``dynamic_k`` (None without probs), ``srp`` (``srp_layers``), ``sch``
    (``sch_layers`` at ``sch_seg_lens`` on every ``sch_doc_stride``-th document; None when layers
    differ in E), ``cache`` (``cache_curves``, or None when ``cache=False``).
    NaN becomes None.  An empty trace raises MoekitError."""
    ids = np.asarray(trace.ids)
    if ids.ndim != 3 or ids.shape[1] == 0:
        raise MoekitError("cannot summarise an empty trace")
    n_layers = ids.shape[0]
    ne = list(trace.num_experts)
    tk = list(trace.top_k)
    layers = list(trace.layers)
    doc = np.asarray(trace.doc)
    out: dict[str, Any] = {
        "model": {
            "id": trace.meta.get("model"),
            "layers": layers,
            "num_experts": ne,
            "top_k": tk,
            "tokens": int(ids.shape[1]),
            "documents": int(np.unique(doc).size),
        },
        "layers": layer_summary(trace),
        "load": [expert_load(ids[i], ne[i]).tolist() for i in range(n_layers)],
    }
    cl = layers[n_layers // 2] if coactivation_layer is None else coactivation_layer
    pos = trace.layer_pos(cl)
    out["coactivation"] = {"layer": int(cl), "counts": coactivation(ids[pos], ne[pos]).tolist()}
    out["affinity"] = None
    if pos + 1 < n_layers:
        out["affinity"] = {"layer": int(cl), "next_layer": int(layers[pos + 1]),
                           "p": layer_affinity(ids[pos], ids[pos + 1], ne[pos], ne[pos + 1]).tolist()}
    out["domains"] = None
    if trace.has_domains:
        names = trace.domains
        dom = np.asarray(trace.domain)
        per_layer = []
        for i in range(n_layers):
            freq = domain_frequency(ids[i], dom, ne[i], len(names))
            per_layer.append({
                "layer": int(layers[i]),
                "frequency": freq.tolist(),
                "mi": domain_mutual_information(ids[i], dom, ne[i]),
                "shuffled_mi": shuffled_mi(ids[i], dom, ne[i], seed=seed),
                "top_experts": top_experts_per_domain(freq, n=5, by="lift", domains=names),
            })
        out["domains"] = {"names": names, "layers": per_layer}
    out["dynamic_k"] = None
    if trace.probs is not None:
        out["dynamic_k"] = dynamic_k_profile(np.asarray(trace.probs),
                                             np.asarray(trace.domain) if trace.has_domains else None,
                                             n_domains=len(trace.domains) if trace.has_domains else None)
    same_e = len(set(ne)) == 1
    out["srp"] = srp_layers(ids, doc, ne, seg_lens)
    out["sch"] = None
    if same_e and sch_seg_lens:
        out["sch"] = sch_layers(ids, doc, ne[0], max(tk), sch_seg_lens, doc_stride=sch_doc_stride)
    out["cache"] = cache_curves(trace, multipliers) if cache else None
    return jsonable(out)
