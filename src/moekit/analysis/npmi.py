"""Normalised pointwise mutual information between experts and a token class.

Source: nPMI (Bouma 2009, "Normalized (pointwise) mutual information in collocation extraction"), as
used to find "cognitive"/marker experts in RICE (Wang et al. 2025, "Two Experts Are All You Need
for Steering Thinking") and for steering-expert detection in SteerMoE.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import numpy as np

from moekit.analysis._common import selection_mask
from moekit.errors import MoekitError


def token_class_mask(
    token_ids: np.ndarray,
    class_ids: Iterable[int] | None = None,
    regex: str | None = None,
    decode: Callable[[int], str] | None = None,
) -> np.ndarray:
    """Boolean ``[N]``: tokens in the class.

    The class is the union of ``class_ids`` (token ids) and, when ``regex`` is given, of the tokens
    whose decoded text (``decode(token_id)``) matches it (``re.search``).  Each distinct token id is
    decoded once.  At least one of ``class_ids`` / ``regex`` must be given; ``regex`` needs ``decode``.
    """
    tok = np.asarray(token_ids)
    if class_ids is None and regex is None:
        raise MoekitError("token_class_mask: give class_ids, regex, or both")
    mask = np.zeros(tok.shape, dtype=bool)
    if class_ids is not None:
        mask |= np.isin(tok, np.fromiter(class_ids, dtype=np.int64))
    if regex is not None:
        if decode is None:
            raise MoekitError("token_class_mask: a regex needs a decode callable (token id -> text)")
        try:
            pat = re.compile(regex)
        except re.error as exc:
            raise MoekitError(f"token_class_mask: bad regex {regex!r}: {exc}") from None
        uniq = np.unique(tok)
        hit = np.array([bool(pat.search(decode(int(t)))) for t in uniq], dtype=bool)
        mask |= hit[np.searchsorted(uniq, tok)] if uniq.size else False
    return mask


def expert_token_npmi(ids: np.ndarray, token_mask: np.ndarray, num_experts: int) -> np.ndarray:
    """``[E]`` nPMI(e, t) = log(p(e,t) / (p(e) p(t))) / -log p(e,t), one layer (``ids`` ``[N, K]``).

    Events are per token: e = "the token selected expert e", t = "the token is in the class";
    probabilities are fractions of the N tokens.  Edge conventions: p(e,t) = 0 (including p(e) = 0
    or p(t) = 0) gives -1 (never co-occur); p(e,t) = 1 (every token is in the class and selects e)
    gives +1 (the limit of perfect co-occurrence).  The value lies in [-1, 1].
    """
    m = selection_mask(ids, num_experts)
    t = np.asarray(token_mask, dtype=bool)
    if t.shape != (m.shape[0],):
        raise MoekitError(f"token_mask must have shape ({m.shape[0]},), got {t.shape}")
    n = m.shape[0]
    if n == 0:
        raise MoekitError("expert_token_npmi: no tokens")
    n_e = m.sum(axis=0).astype(np.float64)
    n_t = float(t.sum())
    n_et = m[t].sum(axis=0).astype(np.float64)
    out = np.full(num_experts, -1.0)
    ok = n_et > 0
    p_et = n_et[ok] / n
    pmi = np.log(p_et) - np.log(n_e[ok] / n) - np.log(n_t / n)
    denom = -np.log(p_et)
    full = denom <= 0  # p(e,t) == 1
    vals = np.where(full, 1.0, pmi / np.where(full, 1.0, denom))
    out[ok] = np.clip(vals, -1.0, 1.0)
    return out
