"""Shared helpers for the analysis package: input checks and the selection mask (numpy only)."""

from __future__ import annotations

import numpy as np

from moekit.errors import MoekitError
from moekit.experts import to_dispatch_ids


def as_ids(ids: np.ndarray, num_experts: int, ndim: int | None = None) -> np.ndarray:
    """``ids`` as an int64 array, checked: values in ``[-1, num_experts)`` (``-1`` = no expert)."""
    arr = np.asarray(ids)
    if ndim is not None and arr.ndim != ndim:
        raise MoekitError(f"expected expert ids with {ndim} dimensions, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise MoekitError(f"expert ids must be integers, got dtype {arr.dtype}")
    if num_experts <= 0:
        raise MoekitError(f"number of experts must be positive, got {num_experts}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < -1 or hi >= num_experts:
            raise MoekitError(f"expert ids must lie in [-1, {num_experts}), found range [{lo}, {hi}]")
    return arr


def selection_mask(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """Boolean ``[N, E]``: token n selected expert e (``ids`` is ``[N, K]``; -1 and repeats ignored)."""
    arr = as_ids(ids, num_experts, ndim=2)
    n, k = arr.shape
    mask = np.zeros((n, num_experts + 1), dtype=bool)  # column E absorbs the NO_EXPERT entries
    rows = np.repeat(np.arange(n), k)
    mask[rows, to_dispatch_ids(arr, num_experts).ravel()] = True
    return mask[:, :num_experts]


def doc_starts(doc: np.ndarray) -> np.ndarray:
    """Indices where a new document begins (tokens of one document are contiguous), plus ``len(doc)``."""
    d = np.asarray(doc)
    if d.ndim != 1:
        raise MoekitError(f"doc must be one-dimensional, got shape {d.shape}")
    if d.size == 0:
        return np.zeros(1, dtype=np.int64)
    change = np.flatnonzero(d[1:] != d[:-1]) + 1
    return np.concatenate([[0], change, [d.size]]).astype(np.int64)
