"""Expert co-activation within a layer and inter-layer affinity.

Sources: co-activation counts as in the OpenMoE analysis (Xue et al. 2024) and MoE-Infinity's expert
activation matrices; inter-layer affinity P(expert at l+1 | expert at l) as in "Exploiting Inter-Layer
Expert Affinity for Accelerating MoE Inference" (Yao et al. 2024) and the cross-layer prefetch
argument of mixtral-offloading (Eliseev & Mazur 2023).
"""

from __future__ import annotations

import numpy as np

from moekit.analysis._common import as_ids
from moekit.errors import MoekitError


def _dedup(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """``[N, K]`` ids with each token's repeats replaced by -1 (a selection is a set)."""
    arr = np.sort(as_ids(ids, num_experts, ndim=2), axis=1)
    if arr.shape[1] > 1:
        rep = np.zeros(arr.shape, dtype=bool)
        rep[:, 1:] = arr[:, 1:] == arr[:, :-1]
        arr[rep] = -1
    return arr


def _pair_counts(a: np.ndarray, b: np.ndarray, e_a: int, e_b: int) -> np.ndarray:
    """``[E_a, E_b]`` int64: number of tokens n with a-id x and b-id y (each (slot, slot) pair once)."""
    out = np.zeros(e_a * e_b, dtype=np.int64)
    step = max(1, (1 << 22) // max(a.shape[1] * b.shape[1], 1))
    for s in range(0, a.shape[0], step):
        x = a[s : s + step, :, None]
        y = b[s : s + step, None, :]
        ok = (x >= 0) & (y >= 0)
        out += np.bincount(np.broadcast_to(x * e_b + y, ok.shape)[ok], minlength=e_a * e_b)
    return out.reshape(e_a, e_b)


def coactivation(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """``[E, E]`` counts: ``C[a, b]`` = number of tokens whose selection contains both a and b.

    ``ids`` is one layer's ``[N, K]``.  A token's selection is a set (repeats and -1 ignored), so the
    diagonal ``C[e, e]`` is the number of tokens that selected e (the load when ids never repeat).
    """
    d = _dedup(ids, num_experts)
    return _pair_counts(d, d, num_experts, num_experts)


def layer_affinity(
    ids_l: np.ndarray,
    ids_next: np.ndarray,
    num_experts_l: int,
    num_experts_next: int,
    normalize: str = "row",
) -> np.ndarray:
    """Affinity between layer l and layer l+1: ``A[e', e]`` for e' at l and e at l+1.

    Counts are ``n[e', e]`` = tokens selecting e' at l and e at l+1.  ``normalize``:
    ``"row"`` (default) divides each row by its sum, so rows sum to 1 and ``A[e', e]`` is
    P(a slot at l+1 holds e | e' selected at l); ``"token"`` divides by the number of tokens that
    selected e' at l, giving P(e selected at l+1 | e' selected at l) (rows sum to about k);
    ``"none"`` returns the counts.  Rows of experts never selected at l are zero.
    """
    a = _dedup(ids_l, num_experts_l)
    b = _dedup(ids_next, num_experts_next)
    if a.shape[0] != b.shape[0]:
        raise MoekitError(f"layer_affinity: {a.shape[0]} tokens at l but {b.shape[0]} at l+1")
    counts = _pair_counts(a, b, num_experts_l, num_experts_next)
    if normalize == "none":
        return counts
    if normalize == "row":
        denom = counts.sum(axis=1, keepdims=True)
    elif normalize == "token":
        denom = np.bincount(a[a >= 0], minlength=num_experts_l).reshape(-1, 1)
    else:
        raise MoekitError(f"layer_affinity: normalize must be 'row', 'token' or 'none', got {normalize!r}")
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, counts / np.maximum(denom, 1), 0.0)
