"""Dynamic-k profile: how many experts are needed to reach router mass p.

Source: top-p ("dynamic") routing of Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic
Routing in MoE Models": sort the softmax probabilities in descending order and keep experts up to
and including the first whose cumulative sum exceeds p (design §5).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from moekit.errors import MoekitError


def experts_to_mass(probs: np.ndarray, p: float) -> np.ndarray:
    """``[...]`` int: experts kept by top-p routing for each row of ``probs`` ``[..., E]``.

    Count = 1 + the number of sorted-descending cumulative sums that are ``<= p`` (i.e. up to and
    including the first cumulative sum that exceeds p), capped at E (a row whose total mass is
    <= p, e.g. by float16 rounding, keeps all E).  Computed in float64; rows are not renormalised.
    """
    if not 0.0 <= p <= 1.0:
        raise MoekitError(f"experts_to_mass: p must be in [0, 1], got {p}")
    pr = np.asarray(probs)
    if pr.ndim < 1 or pr.shape[-1] == 0:
        raise MoekitError(f"experts_to_mass: probs must be [..., E], got shape {pr.shape}")
    e = pr.shape[-1]
    flat = pr.reshape(-1, e)
    out = np.empty(flat.shape[0], dtype=np.int64)
    step = 1 << 15
    for s in range(0, flat.shape[0], step):
        q = np.sort(flat[s : s + step].astype(np.float64), axis=1)[:, ::-1]
        cs = np.cumsum(q, axis=1)
        out[s : s + step] = np.minimum((cs <= p).sum(axis=1) + 1, e)
    return out.reshape(pr.shape[:-1])


def dynamic_k_profile(
    probs: np.ndarray,
    domain: np.ndarray | None = None,
    ps: Sequence[float] = (0.5, 0.8, 0.9),
    n_domains: int | None = None,
) -> dict[str, Any]:
    """Mean experts-to-mass per layer (and per domain) for each p.

    ``probs`` is ``[L, N, E]`` (or ``[N, E]`` for one layer).  Returns ``{"ps": [...],
    "mean": [[per layer] per p], "by_domain": [[[per layer] per domain] per p] or None,
    "hist": [[[count of tokens needing j experts, j = 1..E] per layer] per p]}``.
    A domain with no tokens gets NaN means.
    """
    pr = np.asarray(probs)
    if pr.ndim == 2:
        pr = pr[None]
    if pr.ndim != 3:
        raise MoekitError(f"dynamic_k_profile: probs must be [L, N, E], got shape {np.shape(probs)}")
    n_layers, n, e = pr.shape
    dom = None
    if domain is not None:
        dom = np.asarray(domain).astype(np.int64)
        if dom.shape != (n,):
            raise MoekitError(f"domain must have shape ({n},), got {dom.shape}")
        if n_domains is None:
            n_domains = int(dom.max()) + 1 if dom.size and dom.max() >= 0 else 0
    out: dict[str, Any] = {"ps": [float(p) for p in ps], "mean": [], "by_domain": None if dom is None else [],
                           "hist": []}
    for p in ps:
        means, hists, by_dom = [], [], []
        for li in range(n_layers):
            k = experts_to_mass(pr[li], p)
            means.append(float(k.mean()) if n else float("nan"))
            hists.append(np.bincount(k, minlength=e + 1)[1:].tolist())
            if dom is not None:
                valid = dom >= 0
                sums = np.bincount(dom[valid], weights=k[valid], minlength=n_domains)
                cnts = np.bincount(dom[valid], minlength=n_domains)
                with np.errstate(invalid="ignore", divide="ignore"):
                    by_dom.append(np.where(cnts > 0, sums / np.maximum(cnts, 1), np.nan))
        out["mean"].append(means)
        out["hist"].append(hists)
        if dom is not None:
            out["by_domain"].append(np.array(by_dom).T.tolist() if by_dom else [])
    return out
