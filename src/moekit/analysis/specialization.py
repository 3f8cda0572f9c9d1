"""Domain specialisation of experts: per-domain frequency and mutual information.

Sources: per-domain expert distributions as in Mixtral (Jiang et al. 2024, §5 routing analysis) and
OLMoE (Muennighoff et al. 2024, domain specialisation); the mutual information between expert choice
and a label follows the "expert specialisation" analyses of Dai et al. 2024 (DeepSeekMoE) / the
plug-in estimator of Cover & Thomas.  The shuffled-routing control is ours: it permutes the routing
rows across tokens (keeping the domain labels), which keeps the marginals and destroys the dependence,
so its MI is the estimator's bias floor.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moekit.analysis._common import as_ids
from moekit.errors import MoekitError


def _samples(ids: np.ndarray, domain: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(expert, domain) per valid (token, slot) sample: id >= 0 and domain >= 0."""
    arr = as_ids(ids, num_experts, ndim=2)
    dom = np.asarray(domain).astype(np.int64)
    if dom.shape != (arr.shape[0],):
        raise MoekitError(f"domain must have shape ({arr.shape[0]},), got {dom.shape}")
    d = np.broadcast_to(dom[:, None], arr.shape)
    ok = (arr >= 0) & (d >= 0)
    return arr[ok], d[ok]


def domain_frequency(
    ids: np.ndarray, domain: np.ndarray, num_experts: int, n_domains: int | None = None, normalize: bool = True
) -> np.ndarray:
    """``[D, E]``: how often each domain's tokens select each expert.

    Each (token, slot) selection is one count; tokens with domain -1 are skipped.  With
    ``normalize`` (default) each row is divided by that domain's number of selections (rows sum to 1;
    a domain without tokens gives a zero row).
    """
    e, d = _samples(ids, domain, num_experts)
    if n_domains is None:
        n_domains = int(d.max()) + 1 if d.size else 0
    if d.size and int(d.max()) >= n_domains:
        raise MoekitError(f"domain index {int(d.max())} >= n_domains={n_domains}")
    counts = np.bincount(d * num_experts + e, minlength=n_domains * num_experts).reshape(n_domains, num_experts)
    if not normalize:
        return counts.astype(np.int64)
    tot = counts.sum(axis=1, keepdims=True)
    return np.where(tot > 0, counts / np.maximum(tot, 1), 0.0)


def _entropy(p: np.ndarray) -> float:
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum())


def domain_mutual_information(ids: np.ndarray, domain: np.ndarray, num_experts: int) -> dict[str, Any]:
    """Plug-in mutual information I(expert; domain) over (token, slot) selection samples.

    Each valid selection (id >= 0 with domain >= 0) is one sample (e, d);
    ``I = sum_{d,e} p(d,e) log(p(d,e) / (p(d) p(e)))``.  Returns ``mi_nats``, ``mi_bits``,
    ``domain_entropy_nats``, ``expert_entropy_nats``, ``mi_norm`` (MI / H(domain); 1 when the expert
    choice determines the domain) and ``n_samples``.  No samples -> MoekitError.
    """
    e, d = _samples(ids, domain, num_experts)
    if e.size == 0:
        raise MoekitError("domain_mutual_information: no selections with a domain label")
    n_dom = int(d.max()) + 1
    joint = np.bincount(d * num_experts + e, minlength=n_dom * num_experts).reshape(n_dom, num_experts)
    p = joint / e.size
    pd_ = p.sum(axis=1)
    pe = p.sum(axis=0)
    h_d, h_e, h_de = _entropy(pd_), _entropy(pe), _entropy(p.ravel())
    mi = max(h_d + h_e - h_de, 0.0)
    return {
        "mi_nats": mi,
        "mi_bits": mi / np.log(2.0),
        "domain_entropy_nats": h_d,
        "expert_entropy_nats": h_e,
        "mi_norm": mi / h_d if h_d > 0 else 0.0,
        "n_samples": int(e.size),
    }


def shuffled_mi(ids: np.ndarray, domain: np.ndarray, num_experts: int, seed: int = 0) -> dict[str, Any]:
    """Control for :func:`domain_mutual_information`: the same MI after permuting the routing rows
    across tokens (each token keeps its domain label but gets another token's selection)."""
    arr = np.asarray(ids)
    perm = np.random.default_rng(seed).permutation(arr.shape[0])
    return domain_mutual_information(arr[perm], domain, num_experts)


def top_experts_per_domain(
    freq: np.ndarray, n: int = 5, by: str = "lift", domains: list[str] | None = None
) -> list[dict[str, Any]]:
    """The ``n`` most characteristic experts of each domain from a normalised ``[D, E]`` frequency table.

    ``by="frequency"`` ranks by the domain's own selection frequency; ``by="lift"`` (default) by
    frequency / mean frequency over domains (how much more the domain uses the expert than average).
    Returns one dict per domain: ``domain`` (name or index), ``experts``, ``frequency``, ``lift``.
    """
    f = np.asarray(freq, dtype=np.float64)
    if f.ndim != 2:
        raise MoekitError(f"top_experts_per_domain expects a [D, E] table, got shape {f.shape}")
    avg = f.mean(axis=0)
    lift = np.where(avg > 0, f / np.where(avg > 0, avg, 1.0), 0.0)
    if by == "lift":
        score = lift
    elif by == "frequency":
        score = f
    else:
        raise MoekitError(f"by must be 'lift' or 'frequency', got {by!r}")
    out = []
    for i in range(f.shape[0]):
        order = np.lexsort((np.arange(f.shape[1]), -score[i]))[:n]  # ties -> lower expert id
        out.append({
            "domain": domains[i] if domains is not None else i,
            "experts": order.tolist(),
            "frequency": f[i, order].tolist(),
            "lift": lift[i, order].tolist(),
        })
    return out
